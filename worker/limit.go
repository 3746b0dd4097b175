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

// Release returns a permit.
func (l *LocalLimiter) Release() { l.used.Add(-1) }
