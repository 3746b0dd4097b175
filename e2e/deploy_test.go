package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// exportedFamilies returns the metric families a live /metrics serves.
func exportedFamilies(t *testing.T, p *proxyProc) map[string]string {
	t.Helper()
	resp, err := http.Get("http://" + p.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	fams := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			fams[f[2]] = f[3]
		}
	}
	return fams
}

var metricName = regexp.MustCompile(`\bsniproxy_[a-z0-9_]+`)

// checkExpr fails unless every sniproxy metric expr names is one the proxy
// exports (a histogram's _bucket, _sum and _count included) and its
// brackets balance.
func checkExpr(t *testing.T, where, expr string, fams map[string]string) {
	t.Helper()
	names := metricName.FindAllString(expr, -1)
	if len(names) == 0 {
		t.Errorf("%s: %q uses no sniproxy metric", where, expr)
	}
	for _, n := range names {
		base := n
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(n, suf); ok && fams[b] == "histogram" {
				base = b
			}
		}
		if _, ok := fams[base]; !ok {
			t.Errorf("%s: %q uses %s, which sniproxy does not export", where, expr, n)
		}
	}
	depth := map[rune]int{}
	for _, r := range expr {
		switch r {
		case '(', '{', '[':
			depth[r]++
		case ')':
			depth['(']--
		case '}':
			depth['{']--
		case ']':
			depth['[']--
		}
	}
	for r, d := range depth {
		if d != 0 {
			t.Errorf("%s: %q has unbalanced %c", where, expr, r)
		}
	}
}

// TestDashboardAndAlertsUseExportedMetrics checks deploy/grafana's dashboard
// and deploy/prometheus's alert rules against the /metrics of a running
// proxy with a backend pool (so that the sniproxy_backend_* families are
// there): every metric they name exists, and what the issue lists is
// covered.
func TestDashboardAndAlertsUseExportedMetrics(t *testing.T) {
	be := startTLSBackend(t, "b1", "pool.test")
	p := startProxy(t, fmt.Sprintf(`
listen_addrs: ["LISTEN"]
workers: 1
metrics: {address: "METRICS"}
control_socket: "CTLSOCK"
routes:
  - match: "pool.test"
    backends: [%q]
`, be.addr))
	if _, err := tlsHello(t, p.addr, "pool.test", be.pool); err != nil {
		t.Fatal(err)
	}
	p.waitMetric(t, `sniproxy_connections_total{protocol="tls"}`, 1)
	fams := exportedFamilies(t, p)
	for _, want := range []string{"sniproxy_backend_up", "sniproxy_backend_connections_total", "sniproxy_backend_connections_active"} {
		if _, ok := fams[want]; !ok {
			t.Fatalf("/metrics lacks %s with a pool configured", want)
		}
	}

	b, err := os.ReadFile("../deploy/grafana/sniproxy-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Annotations struct {
			List []struct {
				Expr string `json:"expr"`
			} `json:"list"`
		} `json:"annotations"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard: %v", err)
	}
	used := map[string]bool{}
	for _, pn := range dash.Panels {
		if len(pn.Targets) == 0 {
			t.Errorf("dashboard panel %q has no query", pn.Title)
		}
		for _, tg := range pn.Targets {
			checkExpr(t, "dashboard panel "+pn.Title, tg.Expr, fams)
			for _, n := range metricName.FindAllString(tg.Expr, -1) {
				used[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(n, "_bucket"), "_sum"), "_count")] = true
			}
		}
	}
	for _, a := range dash.Annotations.List {
		checkExpr(t, "dashboard annotation", a.Expr, fams)
	}
	for _, want := range []string{
		"sniproxy_connections_active", "sniproxy_connections_total", "sniproxy_connections_rejected_total",
		"sniproxy_bytes_total", "sniproxy_backend_connect_seconds", "sniproxy_workers", "sniproxy_worker_restarts_total",
		"sniproxy_reloads_total", "sniproxy_backend_up",
	} {
		if !used[want] {
			t.Errorf("the dashboard shows nothing of %s", want)
		}
	}

	b, err = os.ReadFile("../deploy/prometheus/alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Name  string `yaml:"name"`
			Rules []struct {
				Alert       string            `yaml:"alert"`
				Expr        string            `yaml:"expr"`
				For         string            `yaml:"for"`
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(b, &rules); err != nil {
		t.Fatalf("alerts: %v", err)
	}
	alerts := map[string]string{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			checkExpr(t, "alert "+r.Alert, r.Expr, fams)
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" {
				t.Errorf("alert %s lacks a severity or a summary", r.Alert)
			}
			alerts[r.Alert] = r.Expr
		}
	}
	for name, metric := range map[string]string{
		"SniproxyBackendDown":            "sniproxy_backend_up",
		"SniproxyReloadFailed":           "sniproxy_reloads_total",
		"SniproxyConnectionLimitReached": "sniproxy_connections_rejected_total",
		"SniproxyWorkerCrashLoop":        "sniproxy_worker_restarts_total",
		"SniproxyNoWorkers":              "sniproxy_workers",
	} {
		if !strings.Contains(alerts[name], metric) {
			t.Errorf("alert %s missing or not on %s: %q", name, metric, alerts[name])
		}
	}
}
