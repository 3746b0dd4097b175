package e2e

import (
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/sniproxy/sniproxy/config"
)

// dockerfile is the final stage of a Dockerfile: each instruction's
// arguments, by instruction.
type dockerfile map[string][]string

// parseDockerfile reads the final stage of the Dockerfile at path
// (continuation lines joined, comments left out).
func parseDockerfile(t *testing.T, path string) dockerfile {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	stage := dockerfile{} // instructions before the first FROM (ARG)
	var cur string
	for _, line := range strings.Split(string(b), "\n") {
		trimmed := strings.TrimSpace(line)
		if cur == "" && (trimmed == "" || strings.HasPrefix(trimmed, "#")) {
			continue
		}
		if strings.HasSuffix(trimmed, "\\") {
			cur += strings.TrimSuffix(trimmed, "\\") + " "
			continue
		}
		cur += trimmed
		instr, args, _ := strings.Cut(cur, " ")
		cur = ""
		instr = strings.ToUpper(instr)
		if instr == "FROM" {
			stage = dockerfile{}
		}
		stage[instr] = append(stage[instr], strings.TrimSpace(args))
	}
	return stage
}

// one returns the single instance of instr.
func (d dockerfile) one(t *testing.T, instr string) string {
	t.Helper()
	if len(d[instr]) != 1 {
		t.Fatalf("final stage has %d %s instructions; want 1", len(d[instr]), instr)
	}
	return d[instr][0]
}

// TestDockerfile checks the instructions of the image that the rest relies
// on, since no Docker engine runs here: a non-root user, a graceful stop
// signal, a health check on the configured metrics address's /healthz, the
// proxy and metrics ports exposed, sniproxy supervising itself as PID 1,
// and a static build. The image's config must pass check.
func TestDockerfile(t *testing.T) {
	d := parseDockerfile(t, "../Dockerfile")
	cfg, err := config.Load("../deploy/docker/config.yaml", []string{})
	if err != nil {
		t.Fatalf("the image's config: %v", err)
	}

	user := d.one(t, "USER")
	name, _, _ := strings.Cut(user, ":")
	if uid, err := strconv.Atoi(name); err != nil || uid == 0 {
		t.Errorf("USER %q: want a numeric non-root uid (runAsNonRoot can only verify a number)", user)
	}
	if sig := d.one(t, "STOPSIGNAL"); sig != "SIGTERM" && sig != "SIGQUIT" {
		t.Errorf("STOPSIGNAL %q: want SIGTERM or SIGQUIT (a graceful stop)", sig)
	}
	_, port, _ := net.SplitHostPort(cfg.Metrics.Address)
	hc := d.one(t, "HEALTHCHECK")
	if !strings.Contains(hc, `"http://127.0.0.1:`+port+`/healthz"`) || !strings.Contains(hc, "CMD [") {
		t.Errorf("HEALTHCHECK %q: want an exec-form probe of http://127.0.0.1:%s/healthz", hc, port)
	}
	probe := strings.Trim(strings.Fields(hc[strings.Index(hc, "CMD [")+len("CMD ["):])[0], `",`)
	copied := false
	for _, c := range d["COPY"] {
		if strings.HasSuffix(c, " "+probe) {
			copied = true
		}
	}
	if !copied {
		t.Errorf("the health check runs %s, which no COPY puts in the image", probe)
	}
	exposed := strings.Fields(strings.Join(d["EXPOSE"], " "))
	want := []string{port}
	for _, l := range cfg.Listeners {
		_, p, _ := net.SplitHostPort(l.Address)
		want = append(want, p)
	}
	for _, p := range want {
		if !slices.Contains(exposed, p) {
			t.Errorf("EXPOSE %v lacks %s (the image config's ports: %v)", exposed, p, want)
		}
	}
	if ep := d.one(t, "ENTRYPOINT"); ep != `["/usr/bin/sniproxy", "run", "--supervise"]` {
		t.Errorf("ENTRYPOINT %s: want sniproxy run --supervise in exec form (PID 1, keeping itself across reloads)", ep)
	}
	b, _ := os.ReadFile("../Dockerfile")
	if !strings.Contains(string(b), "CGO_ENABLED=0 go build") {
		t.Error("the binary is not built with CGO_ENABLED=0: distroless static has no libc")
	}
	if !strings.Contains(string(b), "--chown=65532:65532 /out/run/sniproxy /run/sniproxy") || cfg.PIDFile != "/run/sniproxy/sniproxy.pid" {
		t.Error("the image must give its user /run/sniproxy (control socket, PID file)")
	}
}

// k8sProbe is a container probe of a Kubernetes manifest.
type k8sProbe struct {
	HTTPGet struct {
		Path string `yaml:"path"`
		Port string `yaml:"port"`
	} `yaml:"httpGet"`
}

// TestKubernetesExample checks deploy/kubernetes against its config: the
// config passes check, the grace period exceeds shutdown_timeout, the
// probes ask /healthz on the metrics port, and the ports match.
func TestKubernetesExample(t *testing.T) {
	dir := "../deploy/kubernetes"
	cfg, err := config.Load(filepath.Join(dir, "config.yaml"), []string{})
	if err != nil {
		t.Fatalf("the example's config: %v", err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "deployment.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var dep struct {
		Spec struct {
			Template struct {
				Spec struct {
					Grace      int `yaml:"terminationGracePeriodSeconds"`
					Containers []struct {
						Ports []struct {
							Name string `yaml:"name"`
							Port int    `yaml:"containerPort"`
						} `yaml:"ports"`
						Readiness k8sProbe `yaml:"readinessProbe"`
						Liveness  k8sProbe `yaml:"livenessProbe"`
					} `yaml:"containers"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	if err := yaml.Unmarshal(b, &dep); err != nil {
		t.Fatal(err)
	}
	spec := dep.Spec.Template.Spec
	if time.Duration(spec.Grace)*time.Second <= cfg.ShutdownTimeout {
		t.Errorf("terminationGracePeriodSeconds %d: want more than shutdown_timeout %v", spec.Grace, cfg.ShutdownTimeout)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers; want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	ports := map[string]string{}
	var all []string
	for _, p := range c.Ports {
		ports[p.Name] = strconv.Itoa(p.Port)
		all = append(all, strconv.Itoa(p.Port))
	}
	_, mport, _ := net.SplitHostPort(cfg.Metrics.Address)
	for what, p := range map[string]k8sProbe{"readinessProbe": c.Readiness, "livenessProbe": c.Liveness} {
		g := p.HTTPGet
		if g.Path != "/healthz" || ports[g.Port] != mport {
			t.Errorf("%s asks %q on port %q (%s); want /healthz on the metrics port %s", what, g.Path, g.Port, ports[g.Port], mport)
		}
	}
	for _, l := range cfg.Listeners {
		if _, p, _ := net.SplitHostPort(l.Address); !slices.Contains(all, p) {
			t.Errorf("listener %s has no containerPort (%v)", l.Address, all)
		}
	}
}
