package master

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"

	"github.com/sniproxy/sniproxy/internal/stats"
)

// Status is what the control socket's GET /status answers, and what
// `sniproxy status` prints.
type Status struct {
	PID           int            `json:"pid"`
	Generation    int            `json:"generation"`
	Version       string         `json:"version"`
	Config        string         `json:"config"`
	Started       time.Time      `json:"started"`
	UptimeSeconds float64        `json:"uptime_seconds"`
	Workers       []WorkerStatus `json:"workers"`
	Restarts      uint64         `json:"worker_restarts"`
	Totals        Totals         `json:"totals"`
}

// WorkerStatus describes one worker slot.
type WorkerStatus struct {
	Slot     int       `json:"slot"`
	PID      int       `json:"pid"`
	Ready    bool      `json:"ready"`
	Active   int64     `json:"active"`
	Restarts uint64    `json:"restarts"`
	Started  time.Time `json:"started"`
}

// Totals are the cumulative counters.
type Totals struct {
	Active      int64             `json:"active"`
	Connections uint64            `json:"connections"`
	Rejected    map[string]uint64 `json:"rejected"`
	BytesIn     uint64            `json:"bytes_in"`
	BytesOut    uint64            `json:"bytes_out"`
}

// status builds the current Status.
func (m *Master) status() Status {
	s := m.counters.snapshot()
	t := Totals{Active: s.Active, Rejected: map[string]uint64{}, BytesIn: s.BytesIn, BytesOut: s.BytesOut}
	for _, n := range s.Conns {
		t.Connections += n
	}
	for i, n := range s.Rejected {
		t.Rejected[stats.Reason(i).String()] = n
	}
	st := Status{
		PID:           os.Getpid(),
		Generation:    m.succession.generation,
		Version:       m.opts.Version,
		Config:        m.cfg.Source,
		Started:       m.start,
		UptimeSeconds: time.Since(m.start).Seconds(),
		Restarts:      m.counters.process().WorkerRestarts,
		Totals:        t,
	}
	restarts := m.sup.restarts()
	for slot, c := range m.sup.list() {
		w := WorkerStatus{Slot: slot, Restarts: restarts[slot]}
		if c != nil {
			w.PID, w.Ready, w.Active, w.Started = c.pid(), c.isReady(), c.active(), c.started
		}
		st.Workers = append(st.Workers, w)
	}
	return st
}

// process returns the master-level values for /metrics.
func (m *Master) process() stats.Process {
	p := m.counters.process()
	kids := m.sup.list()
	p.WorkerActive = make([]int64, len(kids))
	for i, c := range kids {
		if c != nil && c.isReady() {
			p.Workers++
			p.WorkerActive[i] = c.active()
		}
	}
	return p
}

// healthy reports whether every worker slot has a ready worker.
func (m *Master) healthy() bool {
	return m.process().Workers == m.sup.n
}

// controlHandler serves the control socket: GET /status, and POST /reload,
// which answers once the new generation is ready (its PID and generation)
// or the reload failed (the reason).
func (m *Master) controlHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(m.status())
	})
	mux.HandleFunc("POST /reload", func(w http.ResponseWriter, r *http.Request) {
		req := reloadRequest{reply: make(chan reloadResult, 1)}
		var res reloadResult
		select {
		case m.reloads <- req:
			select {
			case res = <-req.reply:
			case <-r.Context().Done():
				return
			}
		case <-time.After(controlBusyWait):
			res.Error = "master is busy (stopping or draining)"
		}
		w.Header().Set("Content-Type", "application/json")
		if res.Error != "" {
			w.WriteHeader(http.StatusInternalServerError)
		}
		json.NewEncoder(w).Encode(res)
	})
	return mux
}

// controlBusyWait bounds how long POST /reload waits for the master's loop
// to take the request.
const controlBusyWait = 10 * time.Second

// endpointsCloseWait bounds how long closing the endpoints lets requests
// under way finish (a `sniproxy reload` waits for its answer).
const endpointsCloseWait = 5 * time.Second

// endpoints is the part that serves /metrics, /healthz and the control
// socket. It belongs to the master's loop (no lock).
type endpoints struct {
	servers []*http.Server
}

// serve serves h on ln in the background until close.
func (e *endpoints) serve(ln net.Listener, h http.Handler) {
	s := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	e.servers = append(e.servers, s)
	go s.Serve(ln)
}

// close closes the servers, letting requests under way finish for at
// most endpointsCloseWait.
func (e *endpoints) close() {
	ctx, cancel := context.WithTimeout(context.Background(), endpointsCloseWait)
	defer cancel()
	for _, s := range e.servers {
		if s.Shutdown(ctx) != nil {
			s.Close()
		}
	}
	e.servers = nil
}

// listenControl binds the control socket. A socket file left by a master
// that died (kill -9) would block the bind: when nothing answers on it, it
// is removed first. A live master's socket is never touched.
func listenControl(network, path string) (net.Listener, error) {
	ln, err := net.Listen(network, path)
	if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
		return ln, err
	}
	c, derr := net.DialTimeout(network, path, time.Second)
	if derr == nil {
		c.Close()
		return nil, fmt.Errorf("%w (another master is running there)", err)
	}
	if !errors.Is(derr, syscall.ECONNREFUSED) {
		return nil, err
	}
	if rerr := os.Remove(path); rerr != nil {
		return nil, fmt.Errorf("%w; removing the stale socket: %w", err, rerr)
	}
	return net.Listen(network, path)
}
