package master

import (
	"context"
	"crypto/tls"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/health"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/internal/status"
	"github.com/sniproxy/sniproxy/ipc"
	"github.com/sniproxy/sniproxy/worker/route"
)

// healthJitter is the part of a check interval by which each wait is
// randomly longer or shorter, so that the checks of many backends, and of
// two generations during a reload, do not fall into step.
const healthJitter = 0.1

// target is one backend the health part tracks, under its health key: a
// backend checked the same way by several routes is one target, checked
// once per interval however many routes and workers use it.
type target struct {
	key     string
	address string
	// check is config.HealthTCP or config.HealthTLS, or "" for a pool
	// without an active check: the master then tcp-checks the backend
	// only while dials have it down, so that it comes back.
	check             string
	sni               string
	interval, timeout time.Duration
	th                health.Thresholds
	routes            []string // the matches of the routes using it, for the log
}

// poolEntry is one backend of one route's pool, in config order: a row of
// the status and a series of the sniproxy_backend_* metrics.
type poolEntry struct {
	route, address, key string
	backup              bool
}

// labels are the metric labels of a pool backend.
type labels struct{ route, backend string }

// healthPart is the part that owns the backends' health: the one
// health.Table every worker follows. It runs the active checks (one prober
// per target, jittered), takes the workers' dial results, decides up and
// down, logs and counts every change, and sends the table to each worker
// right after its config and to every worker on each change. It also
// aggregates the per-backend connection counters the workers push. The
// table and the counters are in the succession state, so a successor
// starts from its predecessor's verdicts (no "all up" window after a
// reload) and its counters stay monotonic.
type healthPart struct {
	log  *slog.Logger
	list func() []*child
	// succession runs a function with the successor's state socket, if
	// one is attached (counters.withSuccessor), so that counts reach the
	// successor exactly once.
	succession func(func(succ *stateSocket))
	targets    map[string]*target
	order      []*target // targets in config order, for the probers
	entries    []poolEntry
	now        func() time.Time
	// probe runs one check of t (tcpCheck or tlsCheck; a fake in tests).
	probe func(ctx context.Context, t *target) error

	stopOnce sync.Once
	cancel   context.CancelFunc
	probers  sync.WaitGroup // the probers and the broadcaster
	// dirty wakes the broadcaster after a change (capacity 1).
	dirty chan struct{}
	// sendMu serialises sending the table (welcome, broadcast).
	sendMu sync.Mutex

	mu      sync.Mutex
	table   health.Table
	version uint64 // incremented on every change
	// encoded is the table's Health message at encodedVersion.
	encoded        ipc.Health
	encodedVersion uint64
	changes        map[string]uint64 // by key
	welcomed       map[*child]bool   // workers sent the table after their config
	conns          map[labels]uint64
	active         map[labels]int64
	byChild        map[*child]map[labels]int64 // each worker's open connections
}

// newHealthPart returns the health part of cfg's pools; list lists the
// workers to send the table to.
func newHealthPart(log *slog.Logger, cfg *config.Config, list func() []*child) *healthPart {
	h := &healthPart{log: log, list: list, targets: map[string]*target{}, now: time.Now, dirty: make(chan struct{}, 1),
		changes: map[string]uint64{}, welcomed: map[*child]bool{},
		conns: map[labels]uint64{}, active: map[labels]int64{}, byChild: map[*child]map[labels]int64{}}
	h.probe = h.check
	for _, r := range cfg.Routes {
		if !r.HasPool() {
			continue
		}
		rise, fall := r.Thresholds()
		pool := r.Pool()
		for j, a := range r.PoolAddresses() {
			key := r.HealthKey(a)
			h.entries = append(h.entries, poolEntry{route: r.Match, address: a, key: key, backup: pool[j].Backup})
			if t := h.targets[key]; t != nil {
				// Checked once, as the first route using it says (its
				// interval, timeout, rise and fall).
				if !slices.Contains(t.routes, r.Match) {
					t.routes = append(t.routes, r.Match)
				}
				continue
			}
			t := &target{key: key, address: a, interval: config.DefaultHealthInterval, timeout: config.DefaultHealthTimeout,
				th: health.Thresholds{Rise: rise, Fall: fall}, routes: []string{r.Match}}
			if hc := r.HealthCheck; hc != nil {
				t.check, t.sni, t.interval, t.timeout = hc.Type, hc.SNI, hc.Interval, hc.Timeout
			}
			h.targets[key] = t
			h.order = append(h.order, t)
		}
	}
	return h
}

// inherit starts from the predecessor's table and counters (st nil for a
// first master), then makes the table hold exactly this config's
// backends: those kept keep their state, new ones start up.
func (h *healthPart) inherit(st *successionState) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if st != nil {
		if len(st.Health) > 0 {
			var t health.Table
			if err := t.UnmarshalBinary(st.Health); err != nil {
				h.log.Warn("previous generation's health table is unusable; every backend starts up", "err", err)
			} else {
				h.table = t
			}
		}
		for k, n := range st.HealthChanges {
			h.changes[k] = n
		}
		for _, c := range st.BackendCounts {
			h.conns[labels{c.Route, c.Backend}] = c.Connections
		}
	}
	keys := make([]string, 0, len(h.order))
	for _, t := range h.order {
		keys = append(keys, t.key)
	}
	h.table.Reconcile(keys, h.now())
}

// start starts one prober per target, and the broadcaster.
func (h *healthPart) start() {
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.probers.Add(1)
	go h.broadcaster(ctx)
	for _, t := range h.order {
		h.probers.Add(1)
		go h.prober(ctx, t)
	}
}

// stop stops the probers and the broadcaster and waits for them: a
// retiring generation leaves the checks to its successor. It is
// idempotent.
func (h *healthPart) stop() {
	h.stopOnce.Do(func() {
		if h.cancel != nil {
			h.cancel()
		}
		h.probers.Wait()
	})
}

// jittered returns d made randomly up to healthJitter longer or shorter.
func jittered(d time.Duration) time.Duration {
	j := time.Duration(float64(d) * healthJitter)
	if j <= 0 {
		return d
	}
	return d - j + rand.N(2*j+1)
}

// prober checks t every interval (jittered; the first check after a
// random part of the interval, so that the targets' checks spread out)
// until ctx is done. A target without an active check is checked (tcp)
// only while it is down.
func (h *healthPart) prober(ctx context.Context, t *target) {
	defer h.probers.Done()
	timer := time.NewTimer(rand.N(t.interval) + 1)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		timer.Reset(jittered(t.interval))
		if t.check == "" && h.up(t.key) {
			continue
		}
		err := h.probe(ctx, t)
		if ctx.Err() != nil {
			return
		}
		r := health.Result{OK: err == nil, Source: health.Check, At: h.now()}
		if err != nil {
			r.Err = route.Failure(err)
		}
		h.observe([]observation{{key: t.key, r: r, n: 1}})
	}
}

// check runs one check of t: a tcp connect, or a tls handshake offering
// t.sni whose certificate is not verified, within t.timeout.
func (h *healthPart) check(ctx context.Context, t *target) error {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", t.address)
	if err != nil {
		return err
	}
	defer c.Close()
	if t.check != config.HealthTLS {
		return nil
	}
	// The check asks whether the backend speaks TLS for this name, not
	// whether its certificate is one a client would trust.
	tc := tls.Client(c, &tls.Config{ServerName: t.sni, InsecureSkipVerify: true}) //nolint:gosec // see above
	if err := tc.HandshakeContext(ctx); err != nil {
		return &tlsError{err}
	}
	return nil
}

// tlsError is a failed tls check's handshake error.
type tlsError struct{ err error }

func (e *tlsError) Error() string { return "tls handshake: " + e.err.Error() }
func (e *tlsError) Unwrap() error { return e.err }

// up reports whether the table has backend key up.
func (h *healthPart) up(key string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.table.Up(key)
}

// observation is n consecutive equal results of one backend.
type observation struct {
	key string
	r   health.Result
	n   int
}

// observe applies results to the table; on any change it logs and counts
// it and sends the table to every worker.
func (h *healthPart) observe(obs []observation) {
	h.mu.Lock()
	defer h.mu.Unlock()
	changed := false
	for _, o := range obs {
		t := h.targets[o.key]
		if t == nil {
			continue // not a backend of this config
		}
		if o.r.Source == health.Dial {
			// Workers report in batches: a run that ended before the
			// backend's last change (which a later result of another
			// worker caused) says nothing new.
			if s, ok := h.table.Get(o.key); ok && o.r.At.Before(s.Since) {
				continue
			}
		}
		// After rise+fall equal results the state cannot change further.
		for range min(o.n, t.th.Rise+t.th.Fall+1) {
			tr, ok := h.table.Observe(o.key, o.r, t.th)
			if !ok {
				continue
			}
			changed = true
			h.changes[o.key]++
			state, level := "down", slog.LevelWarn
			if tr.Up {
				state, level = "up", slog.LevelInfo
			}
			h.log.Log(context.Background(), level, "backend "+state, "route", strings.Join(t.routes, ","),
				"backend", t.address, "check", checkName(t.check), "state", state, "reason", tr.Reason())
		}
	}
	if changed {
		h.changedLocked()
	}
}

// checkName names a target's check for the log.
func checkName(c string) string {
	if c == "" {
		return "dials"
	}
	return c
}

// dialResults applies a worker's dial report.
func (h *healthPart) dialResults(rep ipc.DialReport) {
	now := h.now()
	obs := make([]observation, 0, len(rep.Results))
	for _, r := range rep.Results {
		at := r.Last
		if at.IsZero() || at.After(now) {
			at = now
		}
		obs = append(obs, observation{key: r.Key, r: health.Result{OK: r.OK, Source: health.Dial, Err: r.Reason, At: at}, n: int(r.Count)})
	}
	h.observe(obs)
}

// current returns the Health message of the table as it is now, encoded
// once per change.
func (h *healthPart) current() (ipc.Health, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.encodedVersion != h.version || h.encoded.Table == nil {
		b, err := h.table.MarshalBinary()
		if err != nil {
			h.log.Error("encoding the health table failed", "err", err)
			return ipc.Health{}, false
		}
		h.encoded, h.encodedVersion = ipc.Health{Table: b}, h.version
	}
	return h.encoded, true
}

// welcome sends worker c the table, right after its config (the
// supervisor calls it on Hello): c serves its first connection with it.
// From then on c gets every change.
func (h *healthPart) welcome(c *child) {
	// sendMu orders this send with the broadcasts: each sends the table
	// as it is when it holds sendMu, so a worker never gets an older
	// table after a newer one. Sends never happen under mu: a worker
	// slow to read must not stop the master from reading the workers.
	h.sendMu.Lock()
	defer h.sendMu.Unlock()
	msg, ok := h.current()
	if !ok {
		return
	}
	if err := c.conn.SendBody(msg); err != nil {
		h.log.Warn("sending the health table to a worker failed", "slot", c.slot, "err", err)
		return
	}
	h.mu.Lock()
	h.welcomed[c] = true
	h.mu.Unlock()
}

// changed tells the broadcaster that the table changed.
func (h *healthPart) changedLocked() {
	h.version++
	select {
	case h.dirty <- struct{}{}:
	default: // a broadcast is due already; it sends the latest table
	}
}

// broadcaster sends the table to every welcomed worker after each change,
// until ctx is done.
func (h *healthPart) broadcaster(ctx context.Context) {
	defer h.probers.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.dirty:
		}
		h.broadcast()
	}
}

// broadcast sends the current table to every worker welcomed and alive,
// and forgets the others.
func (h *healthPart) broadcast() {
	h.sendMu.Lock()
	defer h.sendMu.Unlock()
	msg, ok := h.current()
	if !ok {
		return
	}
	kids := h.list()
	h.mu.Lock()
	var to []*child
	alive := map[*child]bool{}
	for _, c := range kids {
		if c != nil && h.welcomed[c] {
			alive[c] = true
			to = append(to, c)
		}
	}
	h.welcomed = alive
	h.mu.Unlock()
	for _, c := range to {
		if err := c.conn.SendBody(msg); err != nil {
			h.log.Debug("sending the health table to a worker failed", "slot", c.slot, "err", err)
		}
	}
}

// addStats adds worker c's per-backend counter deltas, and sends the
// connections on to the successor once one is attached.
func (h *healthPart) addStats(c *child, s ipc.BackendStats) {
	var succ *stateSocket
	add := func(to *stateSocket) {
		succ = to
		h.mu.Lock()
		defer h.mu.Unlock()
		mine := h.byChild[c]
		if mine == nil {
			mine = map[labels]int64{}
			h.byChild[c] = mine
		}
		for _, d := range s.Deltas {
			l := labels{d.Route, d.Backend}
			h.conns[l] += d.Connections
			h.active[l] += d.Active
			mine[l] += d.Active
		}
	}
	if h.succession == nil {
		add(nil)
	} else {
		h.succession(add)
	}
	if succ == nil {
		return
	}
	var out []backendCount
	for _, d := range s.Deltas {
		if d.Connections > 0 {
			out = append(out, backendCount{Route: d.Route, Backend: d.Backend, Connections: d.Connections})
		}
	}
	if len(out) > 0 {
		succ.send(stateMsg{Backends: out})
	}
}

// addPredecessor counts connections the predecessor's draining workers
// made.
func (h *healthPart) addPredecessor(bs []backendCount) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, b := range bs {
		h.conns[labels{b.Route, b.Backend}] += b.Connections
	}
}

// lost takes the open connections of worker c, which exited, off the
// counts.
func (h *healthPart) lost(c *child) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for l, n := range h.byChild[c] {
		h.active[l] -= n
	}
	delete(h.byChild, c)
	delete(h.welcomed, c)
}

// fill adds the health table and the backend counters to the succession
// state.
func (h *healthPart) fill(st *successionState) {
	h.mu.Lock()
	defer h.mu.Unlock()
	b, err := h.table.MarshalBinary()
	if err != nil {
		h.log.Error("encoding the health table for the next generation failed", "err", err)
	}
	st.Health = b
	st.HealthChanges = make(map[string]uint64, len(h.changes))
	for k, n := range h.changes {
		st.HealthChanges[k] = n
	}
	for l, n := range h.conns {
		st.BackendCounts = append(st.BackendCounts, backendCount{Route: l.route, Backend: l.backend, Connections: n})
	}
}

// statuses returns the pool backends as the status shows them, in config
// order.
func (h *healthPart) statuses() []status.Backend {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]status.Backend, 0, len(h.entries))
	for _, e := range h.entries {
		s, _ := h.table.Get(e.key)
		if _, ok := h.table.Get(e.key); !ok {
			s.Up = true
		}
		l := labels{e.route, e.address}
		out = append(out, status.Backend{Route: e.route, Address: e.address, Backup: e.backup, Up: s.Up, Since: s.Since,
			LastError: s.LastError, Active: max(h.active[l], 0), Connections: h.conns[l]})
	}
	return out
}

// metrics returns the pool backends for the sniproxy_backend_* metrics,
// one per pair of labels (two routes with the same match and backend are
// one series).
func (h *healthPart) metrics() []stats.Backend {
	h.mu.Lock()
	defer h.mu.Unlock()
	seen := map[labels]bool{}
	var out []stats.Backend
	for _, e := range h.entries {
		l := labels{e.route, e.address}
		if seen[l] {
			continue
		}
		seen[l] = true
		out = append(out, stats.Backend{Route: e.route, Backend: e.address, Up: h.table.Up(e.key),
			Connections: h.conns[l], Active: h.active[l], Changes: h.changes[e.key]})
	}
	return out
}

// backendCount is a pool backend's connection counter in the succession
// state.
type backendCount struct {
	Route       string `json:"route"`
	Backend     string `json:"backend"`
	Connections uint64 `json:"connections"`
}
