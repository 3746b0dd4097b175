package stats

import (
	"io"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestSnapshotSubAdd(t *testing.T) {
	var c Counters
	c.Opened()
	c.Protocol(ProtoTLS)
	c.Bytes(10, 20)
	first := c.Snapshot()
	c.Opened()
	c.Closed()
	c.Protocol(ProtoHTTP)
	c.Rejected(Denied)
	c.Bytes(5, 0)
	c.BackendConnect(3 * time.Millisecond)
	second := c.Snapshot()

	var total Snapshot
	total.Add(first)
	total.Add(second.Sub(first))
	if total != second {
		t.Errorf("first + (second - first) = %+v; want %+v", total, second)
	}
	d := second.Sub(first)
	if d.Active != 0 || d.Conns[ProtoHTTP] != 1 || d.Rejected[Denied] != 1 || d.BytesIn != 5 || d.ConnectCount != 1 {
		t.Errorf("delta %+v", d)
	}
	// 3ms falls in the 0.005 bucket (index 3).
	if d.ConnectBuckets[3] != 1 {
		t.Errorf("buckets %v; want 3ms in the 5ms bucket", d.ConnectBuckets)
	}
}

func TestCountersConcurrent(t *testing.T) {
	var c Counters
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 1000 {
				c.Opened()
				c.Bytes(1, 2)
				c.Closed()
			}
		}()
	}
	wg.Wait()
	s := c.Snapshot()
	if s.Active != 0 || s.BytesIn != 8000 || s.BytesOut != 16000 {
		t.Errorf("got %+v", s)
	}
}

func TestHandlerExposesSpecMetrics(t *testing.T) {
	var c Counters
	c.Protocol(ProtoH2C)
	c.Rejected(SniffTimeout)
	c.Rejected(ProxyHeader)
	c.Rejected(ProxyHeader)
	c.BackendConnect(time.Second)
	col := NewCollector(c.Snapshot, func() Process {
		return Process{Workers: 2, WorkerRestarts: 3, ReloadsOK: 1, WorkerActive: []int64{4, 5}}
	}, "v1.2.3", "go1.26.8")
	healthy := true
	srv := httptest.NewServer(Handler(col, func() bool { return healthy }))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	body := string(b)
	for _, want := range []string{
		`sniproxy_connections_active 0`,
		`sniproxy_connections_total{protocol="h2c"} 1`,
		`sniproxy_connections_total{protocol="unknown"} 0`,
		`sniproxy_connections_rejected_total{reason="sniff_timeout"} 1`,
		`sniproxy_connections_rejected_total{reason="limit"} 0`,
		`sniproxy_connections_rejected_total{reason="proxy_header"} 2`,
		`sniproxy_bytes_total{direction="in"} 0`,
		`sniproxy_backend_connect_seconds_bucket{le="1"} 1`,
		`sniproxy_backend_connect_seconds_count 1`,
		`sniproxy_workers 2`,
		`sniproxy_worker_restarts_total 3`,
		`sniproxy_reloads_total{result="ok"} 1`,
		`sniproxy_reloads_total{result="failed"} 0`,
		`sniproxy_build_info{goversion="go1.26.8",version="v1.2.3"} 1`,
		`sniproxy_worker_connections_active{slot="1"} 5`,
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	for _, tc := range []struct {
		healthy bool
		code    int
	}{{true, 200}, {false, 503}} {
		healthy = tc.healthy
		resp, err := srv.Client().Get(srv.URL + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.code {
			t.Errorf("healthz with healthy=%v: %d; want %d", tc.healthy, resp.StatusCode, tc.code)
		}
	}
}

// TestReasonNames checks every reason has its own label value, each one of
// SPEC's, and that the reasons a predecessor already counted keep their
// position (a successor decodes the counters it inherits by position).
func TestReasonNames(t *testing.T) {
	spec := map[string]bool{"limit": true, "per_ip_limit": true, "proxy_header": true, "denied": true,
		"no_route": true, "sniff_timeout": true, "sniff_error": true, "dial_error": true}
	seen := map[string]bool{}
	for r := range NumReasons {
		n := r.String()
		if !spec[n] || seen[n] {
			t.Errorf("reason %d is %q: not one of SPEC's reasons, or a duplicate", r, n)
		}
		seen[n] = true
	}
	for r, want := range map[Reason]string{Limit: "limit", DialError: "dial_error", ProxyHeader: "proxy_header"} {
		if r.String() != want {
			t.Errorf("reason %d is %q; want %q", r, r.String(), want)
		}
	}
	if DialError != 5 {
		t.Errorf("DialError is %d; want 5 (new reasons go last)", DialError)
	}
}
