#!/usr/bin/env bash
# Builds the Debian package of sniproxy (package name sniproxy-go; see
# nfpm.yaml for why) with goreleaser/nfpm, and prints the .deb's path.
# Output goes to dist/ at the repository root.
#
#   packaging/build-deb.sh                 version from git: 0.0.0~gitYYYYMMDD.<commit>
#   SNIPROXY_VERSION=1.2.0 packaging/build-deb.sh
#   GOARCH=arm64 packaging/build-deb.sh     cross-build (static, no cgo)
#
# Needs only Go (nfpm is built from the Go module proxy) and, for the
# version, git.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

NFPM_VERSION=v2.45.2
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -z "${SNIPROXY_VERSION:-}" ]; then
	when=$(git log -1 --format=%cd --date=format:%Y%m%d 2>/dev/null || date -u +%Y%m%d)
	SNIPROXY_VERSION="0.0.0~git${when}.${commit}"
fi
export SNIPROXY_VERSION
goarch=${GOARCH:-$(go env GOARCH)}
case "$goarch" in
amd64 | arm64 | ppc64le | s390x | riscv64) DEB_ARCH=$goarch ;;
386) DEB_ARCH=i386 ;;
arm) DEB_ARCH=armhf ;;
*) echo "build-deb.sh: no Debian architecture for GOARCH=$goarch" >&2; exit 1 ;;
esac
export DEB_ARCH

STAGE=$root/dist/stage
export STAGE
rm -rf "$STAGE"
mkdir -p "$STAGE/man" "$STAGE/completions" "$STAGE/scripts"

# A static binary with the version stamped in.
CGO_ENABLED=0 GOARCH=$goarch GOFLAGS= go build -trimpath -buildvcs=true \
	-ldflags "-s -w -X main.version=${SNIPROXY_VERSION}" \
	-o "$STAGE/sniproxy" ./cmd/sniproxy

# Man pages and completions come from the command tree itself; run a
# native build of it when cross-building.
gen=$STAGE/sniproxy
if [ "$goarch" != "$(go env GOHOSTARCH)" ]; then
	gen=$STAGE/sniproxy-host
	CGO_ENABLED=0 GOARCH= GOFLAGS= go build -o "$gen" ./cmd/sniproxy
fi
"$gen" man "$STAGE/man"
"$gen" completion bash >"$STAGE/completions/sniproxy.bash"
"$gen" completion zsh >"$STAGE/completions/_sniproxy"
"$gen" completion fish >"$STAGE/completions/sniproxy.fish"
gzip -9n "$STAGE"/man/*.1
[ "$gen" = "$STAGE/sniproxy" ] || rm -f "$gen"

# The unit as installed by the package: the binary in /usr/bin and the
# package's static sniproxy user instead of a dynamic one.
sed -e 's#/usr/local/bin/sniproxy#/usr/bin/sniproxy#g' \
	-e 's#^\# /etc/systemd/system/sniproxy.service, with the binary at /usr/bin/sniproxy#\# /lib/systemd/system/sniproxy.service by the sniproxy-go package, with the binary at /usr/bin/sniproxy#' \
	-e '/^DynamicUser=/d' \
	systemd/sniproxy.service >"$STAGE/sniproxy.service"
cp packaging/sysusers.conf "$STAGE/sysusers.conf"
cp etc/config.yaml "$STAGE/config.yaml"
cp etc/logrotate "$STAGE/logrotate"
cp README.md "$STAGE/README.md"
cp packaging/scripts/postinst packaging/scripts/prerm packaging/scripts/postrm "$STAGE/scripts/"

deb="$root/dist/sniproxy-go_${SNIPROXY_VERSION}_${DEB_ARCH}.deb"
rm -f "$deb"
# nfpm expands variables in only some fields: fill them all in here.
sed -e "s|\${STAGE}|$STAGE|g" -e "s|\${SNIPROXY_VERSION}|$SNIPROXY_VERSION|g" \
	-e "s|\${DEB_ARCH}|$DEB_ARCH|g" packaging/nfpm.yaml >"$STAGE/nfpm.yaml"
GOFLAGS= go run "github.com/goreleaser/nfpm/v2/cmd/nfpm@${NFPM_VERSION}" \
	package --config "$STAGE/nfpm.yaml" --packager deb --target "$deb" >&2
echo "$deb"
