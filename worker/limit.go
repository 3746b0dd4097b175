package worker

import "sync/atomic"

// LocalLimiter is a Limiter for one process: at most Max connections at
// once. The zero value admits nothing; use NewLocalLimiter.
type LocalLimiter struct {
	max  int64
	used atomic.Int64
}

// NewLocalLimiter returns a limiter admitting max connections at once.
func NewLocalLimiter(max int) *LocalLimiter { return &LocalLimiter{max: int64(max)} }

// Acquire takes a permit if one is free.
func (l *LocalLimiter) Acquire() bool {
	if l.used.Add(1) > l.max {
		l.used.Add(-1)
		return false
	}
	return true
}

// AcquireSpare is Acquire, which never waits (the event loop's call).
func (l *LocalLimiter) AcquireSpare() bool { return l.Acquire() }

// Release returns a permit.
func (l *LocalLimiter) Release() { l.used.Add(-1) }
