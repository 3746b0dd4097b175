package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"
)

// browser is headless Chromium driven over the DevTools protocol on a pipe
// (--remote-debugging-pipe: JSON messages ending in a NUL byte, commands on
// fd 3, answers and events on fd 4). Only the few commands the tests need
// are wrapped; no library is pulled in for them.
type browser struct {
	t       *testing.T
	cmd     *exec.Cmd
	in      *os.File // our end of Chromium's fd 3
	out     *bufio.Reader
	mu      sync.Mutex
	nextID  int
	session string
	events  []map[string]any // events read while waiting for answers
}

// newBrowser starts Chromium; it is killed when the test ends.
func newBrowser(t *testing.T) *browser {
	t.Helper()
	bin, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is not installed; .ci/run installs it")
	}
	cmdR, cmdW, err := os.Pipe() // Chromium reads commands from fd 3
	if err != nil {
		t.Fatal(err)
	}
	evR, evW, err := os.Pipe() // and writes to fd 4
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-dev-shm-usage", "--hide-scrollbars", "--user-data-dir="+t.TempDir(),
		"--remote-debugging-pipe", "about:blank")
	cmd.ExtraFiles = []*os.File{cmdR, evW}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	cmdR.Close()
	evW.Close()
	b := &browser{t: t, cmd: cmd, in: cmdW, out: bufio.NewReader(evR)}
	t.Cleanup(func() {
		cmdW.Close()
		cmd.Process.Kill()
		cmd.Wait()
		evR.Close()
	})
	// Attach to the page Chromium opened.
	var targets struct {
		TargetInfos []struct {
			TargetID string `json:"targetId"`
			Type     string `json:"type"`
		} `json:"targetInfos"`
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		b.call("", "Target.getTargets", nil, &targets)
		for _, ti := range targets.TargetInfos {
			if ti.Type == "page" {
				var att struct {
					SessionID string `json:"sessionId"`
				}
				b.call("", "Target.attachToTarget", map[string]any{"targetId": ti.TargetID, "flatten": true}, &att)
				b.session = att.SessionID
				return b
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("chromium opened no page")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// call sends method with params (to the page session unless session is
// "") and decodes the answer's result into result.
func (b *browser) call(session, method string, params any, result any) {
	b.t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.nextID++
	id := b.nextID
	msg := map[string]any{"id": id, "method": method}
	if params != nil {
		msg["params"] = params
	}
	if session != "" {
		msg["sessionId"] = session
	}
	enc, _ := json.Marshal(msg)
	if _, err := b.in.Write(append(enc, 0)); err != nil {
		b.t.Fatalf("cdp %s: %v", method, err)
	}
	done := make(chan error, 1)
	var raw json.RawMessage
	go func() {
		for {
			line, err := b.out.ReadBytes(0)
			if err != nil {
				done <- err
				return
			}
			var m struct {
				ID     int             `json:"id"`
				Method string          `json:"method"`
				Result json.RawMessage `json:"result"`
				Error  *struct {
					Message string `json:"message"`
				} `json:"error"`
			}
			if err := json.Unmarshal(bytes.TrimSuffix(line, []byte{0}), &m); err != nil {
				done <- err
				return
			}
			if m.ID == 0 {
				var ev map[string]any
				json.Unmarshal(bytes.TrimSuffix(line, []byte{0}), &ev)
				b.events = append(b.events, ev)
				continue
			}
			if m.ID != id {
				continue
			}
			if m.Error != nil {
				done <- fmt.Errorf("%s", m.Error.Message)
				return
			}
			raw = m.Result
			done <- nil
			return
		}
	}()
	select {
	case err := <-done:
		if err != nil {
			b.t.Fatalf("cdp %s: %v", method, err)
		}
	case <-time.After(60 * time.Second):
		b.t.Fatalf("cdp %s: no answer within 60s", method)
	}
	if result != nil {
		if err := json.Unmarshal(raw, result); err != nil {
			b.t.Fatalf("cdp %s: %v", method, err)
		}
	}
}

// open loads url in the page, with the page's scripts on or off and the
// viewport w×h, and waits until it has loaded.
func (b *browser) open(url string, scripts bool, w, h int) {
	b.t.Helper()
	b.call(b.session, "Emulation.setScriptExecutionDisabled", map[string]any{"value": !scripts}, nil)
	b.call(b.session, "Emulation.setDeviceMetricsOverride", map[string]any{"width": w, "height": h, "deviceScaleFactor": 1, "mobile": w < 600}, nil)
	b.call(b.session, "Page.enable", nil, nil)
	b.mu.Lock()
	b.events = nil
	b.mu.Unlock()
	b.call(b.session, "Page.navigate", map[string]any{"url": url}, nil)
	// Poll the document's ready state through the DOM domain, which works
	// with the page's scripts off.
	deadline := time.Now().Add(30 * time.Second)
	for !b.loaded() {
		if time.Now().After(deadline) {
			b.t.Fatalf("%s did not load within 30s", url)
		}
		b.call(b.session, "DOM.getDocument", map[string]any{"depth": 0}, nil)
	}
}

// loaded reports whether a Page.loadEventFired event has arrived.
func (b *browser) loaded() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, ev := range b.events {
		if ev["method"] == "Page.loadEventFired" {
			return true
		}
	}
	return false
}

// html returns the page's DOM as HTML, read through the DOM domain (not by
// a script in the page, so it works with scripts off).
func (b *browser) html() string {
	b.t.Helper()
	var doc struct {
		Root struct {
			NodeID int `json:"nodeId"`
		} `json:"root"`
	}
	b.call(b.session, "DOM.getDocument", map[string]any{"depth": -1}, &doc)
	var out struct {
		OuterHTML string `json:"outerHTML"`
	}
	b.call(b.session, "DOM.getOuterHTML", map[string]any{"nodeId": doc.Root.NodeID}, &out)
	return out.OuterHTML
}

// screenshot returns a PNG of the viewport.
func (b *browser) screenshot() []byte {
	b.t.Helper()
	var shot struct {
		Data string `json:"data"`
	}
	b.call(b.session, "Page.captureScreenshot", map[string]any{"format": "png"}, &shot)
	png, err := base64.StdEncoding.DecodeString(shot.Data)
	if err != nil {
		b.t.Fatalf("screenshot: %v", err)
	}
	return png
}

// waitHTML polls the DOM until it contains want, for at most d.
func (b *browser) waitHTML(want string, d time.Duration) (string, bool) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	for {
		h := b.html()
		if bytes.Contains([]byte(h), []byte(want)) {
			return h, true
		}
		select {
		case <-ctx.Done():
			return h, false
		case <-time.After(100 * time.Millisecond):
		}
	}
}
