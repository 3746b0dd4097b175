package proxy

import (
	"math"
	"sync"
	"time"
)

// Places of a pair in an idleClock besides an index into its heap.
const (
	notQueued int32 = -1 // not in the heap: not added yet, or being checked
	clockDone int32 = -2 // the pair finished: never added again
)

// idleClock runs the idle checks of many pairs on one timer: each pair has
// a place in a heap ordered by when it may next be idle (a 16-byte entry,
// and an index in the pair) instead of a time.Timer and its callback of
// its own (128 bytes, and a runtime timer, per pair). A Poller has one for
// the pairs started with it; a pair without a Poller gets one of its own.
//
// Like a timer per pair, it is re-armed only when a check is due: moving
// bytes costs nothing here.
type idleClock struct {
	mu    sync.Mutex
	heap  []clockEntry // min-heap by due
	timer *time.Timer
	// at is when timer fires (UnixNano), 0 if it is not armed.
	at int64
}

// clockEntry is a pair's place in an idleClock.
type clockEntry struct {
	due int64 // UnixNano when the pair may be idle
	p   *pair
}

func newIdleClock() *idleClock {
	c := &idleClock{}
	c.timer = time.AfterFunc(math.MaxInt64, c.fire)
	c.timer.Stop()
	return c
}

// add queues p's next idle check at due (UnixNano), unless p finished.
func (c *idleClock) add(p *pair, due int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p.clockIdx != notQueued {
		return // finished (or queued already, which cannot happen)
	}
	p.clockIdx = int32(len(c.heap))
	c.heap = append(c.heap, clockEntry{due: due, p: p})
	c.up(len(c.heap) - 1)
	c.armLocked()
}

// remove takes p out of the clock for good (its pair finished).
func (c *idleClock) remove(p *pair) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i := int(p.clockIdx); i >= 0 {
		last := len(c.heap) - 1
		if i != last {
			c.swap(i, last)
		}
		c.heap[last] = clockEntry{}
		c.heap = c.heap[:last]
		if i != last {
			c.down(i)
			c.up(i)
		}
	}
	p.clockIdx = clockDone
	if len(c.heap) == 0 {
		// Let the slice and the timer go with the last pair: a quiet
		// worker holds neither.
		c.heap = nil
		c.timer.Stop()
		c.at = 0
	}
}

// idleDue returns when a pair whose last byte moved at last (UnixNano)
// may be idle for the timeout idle, saturated rather than wrapped.
func idleDue(last int64, idle time.Duration) int64 {
	if due := last + int64(idle); due >= last {
		return due
	}
	return math.MaxInt64
}

// armLocked makes the timer fire when the first check is due.
func (c *idleClock) armLocked() {
	if len(c.heap) == 0 {
		return
	}
	due := c.heap[0].due
	if c.at != 0 && c.at <= due {
		return
	}
	c.at = due
	c.timer.Reset(time.Duration(due - time.Now().UnixNano()))
}

// fire runs the checks that are due; each pair still not idle is queued
// again for when it may be.
func (c *idleClock) fire() {
	now := time.Now().UnixNano()
	var due []*pair
	c.mu.Lock()
	c.at = 0
	for len(c.heap) > 0 && c.heap[0].due <= now {
		p := c.heap[0].p
		last := len(c.heap) - 1
		c.swap(0, last)
		c.heap[last] = clockEntry{}
		c.heap = c.heap[:last]
		c.down(0)
		p.clockIdx = notQueued
		due = append(due, p)
	}
	c.armLocked()
	c.mu.Unlock()
	for _, p := range due {
		p.checkIdle()
	}
}

func (c *idleClock) swap(i, j int) {
	c.heap[i], c.heap[j] = c.heap[j], c.heap[i]
	c.heap[i].p.clockIdx = int32(i)
	c.heap[j].p.clockIdx = int32(j)
}

func (c *idleClock) up(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if c.heap[parent].due <= c.heap[i].due {
			return
		}
		c.swap(i, parent)
		i = parent
	}
}

func (c *idleClock) down(i int) {
	for {
		l := 2*i + 1
		if l >= len(c.heap) {
			return
		}
		m := l
		if r := l + 1; r < len(c.heap) && c.heap[r].due < c.heap[l].due {
			m = r
		}
		if c.heap[i].due <= c.heap[m].due {
			return
		}
		c.swap(i, m)
		i = m
	}
}
