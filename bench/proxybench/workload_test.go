package main

import (
	"context"
	"net"
	"testing"
	"time"
)

// TestWorkloadsDirect runs each short-connection workload and the
// ping-pong against its backend with no proxy between: the client and the
// backend must agree on every byte.
func TestWorkloadsDirect(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pair, err := newTLSPair()
	if err != nil {
		t.Fatal(err)
	}
	e := &benchEnv{hello: []byte("\x16\x03\x01 not really a hello"), tls: pair}
	for _, mode := range []string{"rate", "tls", "http"} {
		t.Run(mode, func(t *testing.T) {
			wl := e.workload(mode)
			be, err := wl.start()
			if err != nil {
				t.Fatal(err)
			}
			defer be.close()
			res, err := measureRate(ctx, be.addr(), wl.shot, 4, time.Minute, 40)
			if err != nil {
				t.Fatal(err)
			}
			if res.OK != 40 || res.Failed != 0 {
				t.Errorf("%d ok, %d failed (first: %s), want 40 ok", res.OK, res.Failed, res.FirstErr)
			}
			if n := be.errorCount(); n > 0 {
				t.Errorf("backend: %d errors, first: %s", n, be.lastError())
			}
		})
	}
	t.Run("pingpong", func(t *testing.T) {
		be, err := startBackend(e.hello, modeEcho, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer be.close()
		rtts, err := measurePingPong(ctx, be.addr(), e.hello, 300, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if len(rtts) != 300 {
			t.Errorf("%d round trips, want 300", len(rtts))
		}
	})
	t.Run("streams", func(t *testing.T) {
		be, err := startBackend(e.hello, modeSource, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer be.close()
		if _, err := measureStreams(ctx, be.addr(), e.hello, be, 1<<20, 4); err != nil {
			t.Fatal(err)
		}
	})
}

// TestHTTPWrongPreamble checks that the backend refuses a request that a
// proxy changed, so a proxy cannot pass by rewriting it.
func TestHTTPWrongPreamble(t *testing.T) {
	be, err := startBackend([]byte(httpRequest), modeHTTPReply, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer be.close()
	c, err := net.Dial("tcp", be.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	bad := []byte(httpRequest)
	bad[len(bad)-5] = 'X'
	if _, err := c.Write(bad); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 100)); err == nil {
		t.Errorf("backend answered %d bytes to a changed request", n)
	}
	if be.errorCount() != 1 {
		t.Errorf("backend errors %d, want 1", be.errorCount())
	}
}
