package master

import (
	"encoding/json"
	"net/http"
	"os"
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
	s := m.snapshot()
	t := Totals{Active: s.Active, Rejected: map[string]uint64{}, BytesIn: s.BytesIn, BytesOut: s.BytesOut}
	for _, n := range s.Conns {
		t.Connections += n
	}
	for i, n := range s.Rejected {
		t.Rejected[stats.Reason(i).String()] = n
	}
	st := Status{
		PID:           os.Getpid(),
		Generation:    m.generation,
		Version:       m.opts.Version,
		Config:        m.cfg.Source,
		Started:       m.start,
		UptimeSeconds: time.Since(m.start).Seconds(),
		Totals:        t,
	}
	m.mu.Lock()
	st.Restarts = m.restarts
	for slot, c := range m.children {
		w := WorkerStatus{Slot: slot, Restarts: m.slotRestarts[slot]}
		if c != nil {
			w.PID, w.Ready, w.Active, w.Started = c.pid(), c.isReady(), c.active(), c.started
		}
		st.Workers = append(st.Workers, w)
	}
	m.mu.Unlock()
	return st
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
		case <-time.After(10 * time.Second):
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
