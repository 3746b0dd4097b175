package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image/png"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestStatusPageInChromium loads the status page in headless Chromium, as an
// operator's browser would: with JavaScript off it is complete as the
// server rendered it; with JavaScript on it fetches status.json and
// updates itself in place (the CSP nonce lets its script run); and a
// phone-sized screenshot renders.
func TestStatusPageInChromium(t *testing.T) {
	be := startTLSBackend(t, "b1", "app.example.com")
	p := startProxy(t, fmt.Sprintf(`
listen_addrs: ["LISTEN"]
workers: 2
metrics: {address: "METRICS"}
control_socket: "CTLSOCK"
routes:
  - match: "app.example.com"
    backend: %q
`, be.addr))
	for range 3 {
		if _, err := tlsHello(t, p.addr, "app.example.com", be.pool); err != nil {
			t.Fatal(err)
		}
	}
	p.waitMetric(t, `sniproxy_connections_total{protocol="tls"}`, 3)
	url := "http://" + p.metrics + "/"

	var st struct {
		PID     int `json:"pid"`
		Workers []struct {
			PID int `json:"pid"`
		} `json:"workers"`
		Totals struct {
			Protocols map[string]int `json:"protocols"`
		} `json:"totals"`
	}
	resp, err := http.Get(url + "status.json")
	if err != nil {
		t.Fatal(err)
	}
	err = json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if err != nil || len(st.Workers) != 2 || st.Totals.Protocols["tls"] != 3 {
		t.Fatalf("status.json: %+v, %v", st, err)
	}

	br := newBrowser(t)

	// JavaScript off: everything is in the server's HTML.
	br.open(url, false, 1280, 900)
	dom := br.html()
	for _, want := range []string{
		fmt.Sprintf(`id="pid">%d<`, st.PID),
		fmt.Sprintf(`<td>%d</td>`, st.Workers[0].PID),
		fmt.Sprintf(`<td>%d</td>`, st.Workers[1].PID),
		"static page, reload it to update",
		`<path class="line" id="chart-active"`,
		"sniff_timeout", "No route has a backend pool.",
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("page without JavaScript lacks %q", want)
		}
	}
	if strings.Contains(dom, `data-live="1"`) {
		t.Error("page without JavaScript says it is live")
	}
	if m := regexp.MustCompile(`<tr><td>tls</td><td class="n">(\d+)</td>`).FindStringSubmatch(dom); m == nil || m[1] != "3" {
		t.Errorf("page without JavaScript: tls row %v; want 3 connections", m)
	}
	checkScreenshot(t, br.screenshot(), 1280, 900)

	// JavaScript on, on a phone: the script runs (the CSP nonce allows
	// it), fetches status.json and updates the page in place: a
	// connection made after the page loaded shows up without a reload.
	br.open(url, true, 390, 844)
	if _, ok := br.waitHTML(`data-live="1"`, 20*time.Second); !ok {
		t.Fatal("the page's script never refreshed it (is it blocked?)")
	}
	if _, err := tlsHello(t, p.addr, "app.example.com", be.pool); err != nil {
		t.Fatal(err)
	}
	p.waitMetric(t, `sniproxy_connections_total{protocol="tls"}`, 4)
	dom, ok := br.waitHTML(`<tr><td>tls</td><td class="n">4</td>`, 20*time.Second)
	if !ok {
		t.Errorf("the page did not update in place to 4 TLS connections")
	}
	if m := regexp.MustCompile(`<span id="live" class="(\w+)">([^<]*)<`).FindStringSubmatch(dom); m == nil || m[1] != "dim" || !strings.Contains(m[2], "live") {
		t.Errorf("live indicator: %q", m)
	}
	checkScreenshot(t, br.screenshot(), 390, 844)
}

// checkScreenshot fails unless b is a w×h PNG of a rendered page (not
// blank).
func checkScreenshot(t *testing.T, b []byte, w, h int) {
	t.Helper()
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if r := img.Bounds(); r.Dx() != w || r.Dy() != h {
		t.Errorf("screenshot is %v; want %d×%d", r, w, h)
	}
	colours := map[[4]uint32]bool{}
	for y := 0; y < img.Bounds().Dy(); y += 7 {
		for x := 0; x < img.Bounds().Dx(); x += 7 {
			r, g, b, a := img.At(x, y).RGBA()
			colours[[4]uint32{r, g, b, a}] = true
		}
	}
	if len(colours) < 8 {
		t.Errorf("screenshot has %d colours; the page did not render", len(colours))
	}
	if dir := os.Getenv("E2E_SCREENSHOTS"); dir != "" {
		os.WriteFile(fmt.Sprintf("%s/status-%dx%d.png", dir, w, h), b, 0o644)
	}
}
