# syntax=docker/dockerfile:1
#
# sniproxy container image: a static binary on distroless, as a non-root
# user, with sniproxy as PID 1 supervising itself across reloads.
#
#   docker build -t sniproxy .
#   docker run -d --name sniproxy --stop-timeout 45 -p 80:8080 -p 443:8443 \
#     -v $PWD/config.yaml:/etc/sniproxy/config.yaml:ro sniproxy
#   docker kill -s HUP sniproxy            # hitless reload (binary and config)
#   docker exec sniproxy sniproxy status
#
# The e2e test e2e/docker_test.go checks the instructions below that the
# rest relies on (USER, STOPSIGNAL, HEALTHCHECK, EXPOSE, ENTRYPOINT).

ARG GO_VERSION=1.26

FROM golang:${GO_VERSION} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
# Static (no cgo, no libc): it runs on an image with no libc at all.
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
      -o /out/usr/bin/sniproxy ./cmd/sniproxy \
 && /out/usr/bin/sniproxy check -c deploy/docker/config.yaml >/dev/null \
 && mkdir -p /out/run/sniproxy

# A health check needs an HTTP client in the image, and distroless has
# none (no shell either). busybox's musl build is one static binary of
# ~1 MB; installed as "wget" it runs its wget applet, which exits non-zero
# on a 503. The alternative, no HEALTHCHECK at all, would leave `docker ps`
# and Compose's depends_on: service_healthy blind (Kubernetes ignores
# HEALTHCHECK and uses the probes of deploy/kubernetes instead).
FROM busybox:1.37-musl AS busybox

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/usr/bin/sniproxy /usr/bin/sniproxy
COPY --from=busybox /bin/busybox /usr/bin/wget
COPY deploy/docker/config.yaml /etc/sniproxy/config.yaml
# The control socket's default directory (and the PID file's), writable by
# the user below.
COPY --from=build --chown=65532:65532 /out/run/sniproxy /run/sniproxy
# distroless's "nonroot" user: never root, even if the image's user database
# were replaced.
USER 65532:65532
# Proxy (published as 80 and 443) and metrics/healthz.
EXPOSE 8080 8443 9000
# A graceful stop: stop accepting, drain for at most shutdown_timeout, exit
# 0 (docker stop's default 10 s grace is shorter: use --stop-timeout 45).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["/usr/bin/wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9000/healthz"]
# sniproxy is PID 1: run --supervise keeps this process for the life of the
# proxy (a reload starts a new master and the old one exits; PID 1 must
# not), forwards HUP, USR1, TERM, INT and QUIT to the current master and
# reaps orphans. Explicit rather than left to the PID 1 detection, so that
# `docker run --init` (tini as PID 1) behaves the same.
ENTRYPOINT ["/usr/bin/sniproxy", "run", "--supervise"]
CMD ["--config", "/etc/sniproxy/config.yaml"]
