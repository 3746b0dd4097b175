// Package health keeps the up/down state of backends: a state machine per
// backend fed by check and dial results, and a Table of them that encodes
// to a compact binary form for the workers and for a successor. It does no
// I/O; the master runs the checks, receives the workers' dial results, and
// owns the one Table that is the truth for every worker.
//
// A backend is up until Fall consecutive results fail, then down until Rise
// consecutive results succeed. Active checks and dials count alike: a failed
// dial is a failure and a successful one a success, in the order the master
// receives them. A backend the Table has never seen is up.
package health

import (
	"fmt"
	"maps"
	"slices"
	"time"
)

// Source says where a result comes from.
type Source uint8

// The sources of results.
const (
	// Check is the master's active health check.
	Check Source = iota + 1
	// Dial is a worker's dial of a client connection (passive).
	Dial
)

// String returns "check" or "dial".
func (s Source) String() string {
	switch s {
	case Check:
		return "check"
	case Dial:
		return "dial"
	}
	return fmt.Sprintf("Source(%d)", s)
}

// Result is one check or dial outcome.
type Result struct {
	// OK reports success.
	OK bool
	// Source is where the result comes from.
	Source Source
	// Err says why it failed; it is ignored when OK.
	Err string
	// At is when it happened.
	At time.Time
}

// Thresholds are a backend's rise and fall, both ≥ 1 (a smaller value
// counts as 1).
type Thresholds struct {
	// Rise is the number of consecutive successes that bring a down
	// backend up.
	Rise int
	// Fall is the number of consecutive failures that take an up backend
	// down.
	Fall int
}

// maxCount bounds the consecutive counters, which saturate there.
const maxCount = 1 << 20

// State is one backend's health. The zero State is down since the zero
// time; a new backend starts as Table.Observe or Table.Reconcile makes it:
// up.
type State struct {
	// Up is the backend's state.
	Up bool
	// Since is when Up last changed, or when the backend was first seen.
	Since time.Time
	// Successes and Failures count the latest run of consecutive
	// successes or failures; at most one of them is non-zero.
	Successes int
	Failures  int
	// LastError is the error of the most recent failure, kept after
	// later successes (for status).
	LastError string
	// LastResult is when the most recent result happened.
	LastResult time.Time
}

// Transition is a change of a backend's state, for the log and the
// counters.
type Transition struct {
	// Key names the backend.
	Key string
	// Up is the new state.
	Up bool
	// Source is where the result that tipped it came from.
	Source Source
	// Count is the run of consecutive results that tipped it: the rise or
	// the fall.
	Count int
	// Err is the last failure's error when going down.
	Err string
	// At is when the tipping result happened.
	At time.Time
}

// Reason says why the state changed, for a log line: "3 consecutive
// failures, the last a dial: connection refused" or "2 consecutive
// successes, the last a check".
func (t Transition) Reason() string {
	if t.Up {
		return fmt.Sprintf("%d consecutive successes, the last a %s", t.Count, t.Source)
	}
	return fmt.Sprintf("%d consecutive failures, the last a %s: %s", t.Count, t.Source, t.Err)
}

// observe applies r to s under th and reports whether the state changed.
func (s *State) observe(r Result, th Thresholds) bool {
	rise, fall := max(th.Rise, 1), max(th.Fall, 1)
	s.LastResult = r.At
	if r.OK {
		s.Successes, s.Failures = min(s.Successes+1, maxCount), 0
		if !s.Up && s.Successes >= rise {
			s.Up, s.Since = true, r.At
			return true
		}
		return false
	}
	s.Successes, s.Failures = 0, min(s.Failures+1, maxCount)
	s.LastError = r.Err
	if s.Up && s.Failures >= fall {
		s.Up, s.Since = false, r.At
		return true
	}
	return false
}

// Table is the health of a set of backends, by key. The key is the
// caller's choice; it must name the backend and the way it is checked (for
// example its address and the check's type and name), so that a successor
// with another check does not inherit a verdict it would not reach.
//
// A Table is not safe for concurrent use: one goroutine owns it (the
// master's), and workers get encoded copies. The zero Table is empty and
// ready to use.
type Table struct {
	m map[string]*State
}

// Observe applies result r to the backend key under th, adding the backend
// as up (since r.At) if the Table has not seen it. It returns the change
// and true when the backend went up or down.
func (t *Table) Observe(key string, r Result, th Thresholds) (Transition, bool) {
	s := t.m[key]
	if s == nil {
		s = &State{Up: true, Since: r.At}
		t.set(key, s)
	}
	if !s.observe(r, th) {
		return Transition{}, false
	}
	tr := Transition{Key: key, Up: s.Up, Source: r.Source, At: r.At, Count: s.Successes}
	if !s.Up {
		tr.Count, tr.Err = s.Failures, s.LastError
	}
	return tr, true
}

func (t *Table) set(key string, s *State) {
	if t.m == nil {
		t.m = map[string]*State{}
	}
	t.m[key] = s
}

// Up reports whether backend key is up; a backend the Table has not seen
// is.
func (t *Table) Up(key string) bool {
	s := t.m[key]
	return s == nil || s.Up
}

// Get returns the state of backend key and whether the Table has it.
func (t *Table) Get(key string) (State, bool) {
	s := t.m[key]
	if s == nil {
		return State{}, false
	}
	return *s, true
}

// Len returns the number of backends in the Table.
func (t *Table) Len() int { return len(t.m) }

// Keys returns the backends' keys in increasing order.
func (t *Table) Keys() []string { return slices.Sorted(maps.Keys(t.m)) }

// Reconcile makes the Table hold exactly keys: it drops the backends not
// listed and adds the missing ones as up since now. A successor calls it
// with its config's backends after restoring its predecessor's Table, so
// that backends it keeps keep their state and new ones start up.
func (t *Table) Reconcile(keys []string, now time.Time) {
	want := make(map[string]bool, len(keys))
	for _, k := range keys {
		want[k] = true
		if t.m[k] == nil {
			t.set(k, &State{Up: true, Since: now})
		}
	}
	maps.DeleteFunc(t.m, func(k string, _ *State) bool { return !want[k] })
}
