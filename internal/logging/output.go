package logging

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// FileMode is the mode a log file is created with: the group (adm, say)
// may read it, others may not.
const FileMode = 0o640

// OpenFile opens the log file at path for appending, creating it with
// FileMode (whatever the umask; an existing file keeps its mode).
func OpenFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|os.O_EXCL, FileMode)
	if err == nil {
		if err := f.Chmod(FileMode); err != nil {
			f.Close()
			return nil, fmt.Errorf("logging: %w", err)
		}
		return f, nil
	}
	f, err = os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, FileMode)
	if err != nil {
		return nil, fmt.Errorf("logging: %w", err)
	}
	return f, nil
}

// Output is the file a logger writes to, which may be swapped for another
// while loggers write: log files are reopened on SIGUSR1 (logrotate). Each
// Write goes whole to one file (slog's handlers write a record with one
// Write).
type Output struct {
	mu    sync.Mutex
	f     *os.File
	path  string // "" for a file Output does not own (stderr)
	owned bool
	tty   bool // whether the first file was a terminal (format "auto")
}

// NewOutput returns an Output writing to f, which it does not own (it
// never closes it): os.Stderr, typically.
func NewOutput(f *os.File) *Output {
	return &Output{f: f, tty: isTerminal(f)}
}

// OpenOutput returns an Output writing to the file at path, opened with
// OpenFile; Reopen opens the path again.
func OpenOutput(path string) (*Output, error) {
	f, err := OpenFile(path)
	if err != nil {
		return nil, err
	}
	return &Output{f: f, path: path, owned: true}, nil
}

// Write writes p to the current file.
func (o *Output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.f.Write(p)
}

// File returns the current file. It stays open until the next Reopen or
// Swap, or Close.
func (o *Output) File() *os.File {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.f
}

// Path returns the path Reopen opens, "" when the Output writes to a file
// it was given.
func (o *Output) Path() string { return o.path }

// Reopen opens the Output's path again (a new file after logrotate renamed
// the old one) and writes there from now on. It does nothing for an
// Output without a path. On error the old file stays in use.
func (o *Output) Reopen() error {
	if o.path == "" {
		return nil
	}
	f, err := OpenFile(o.path)
	if err != nil {
		return err
	}
	o.Swap(f)
	return nil
}

// Swap makes the Output write to f, which it owns from now on, and closes
// the file it wrote to before if it owned it.
func (o *Output) Swap(f *os.File) {
	o.mu.Lock()
	old, owned := o.f, o.owned
	o.f, o.owned = f, true
	o.mu.Unlock()
	if owned && old != f {
		old.Close()
	}
}

// Close closes the current file if the Output owns it.
func (o *Output) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.owned {
		return nil
	}
	o.owned = false
	if err := o.f.Close(); err != nil {
		return fmt.Errorf("logging: %w", err)
	}
	return nil
}

// Config is the log section of the config (package config's Log; this
// package does not import config).
type Config struct {
	// Level is debug, info, warn or error ("" is info).
	Level string
	// Format is auto, text or json.
	Format string
	// File is the path lines are appended to; "" is stderr.
	File string
	// Access writes one line per connection.
	Access bool
	// AccessFile is where the access lines go; "" is where the others go.
	AccessFile string
}

// Logs are a process's loggers: the main one and the access log, and the
// files they write to.
type Logs struct {
	// Log is the main logger.
	Log *slog.Logger
	// Level is the main logger's level.
	Level *slog.LevelVar
	// Access is the access logger (one line per connection), nil when
	// the config switches the access log off. Its level is never above
	// info, whatever the main level: log.level does not govern it.
	Access *slog.Logger
	// Main is where the main lines go; AccessOut where the access lines
	// go (Main itself when the config names no access file).
	Main, AccessOut *Output
}

// Open builds the loggers of cfg. Lines go to stderr unless cfg names
// files, which are opened (appended to, created with FileMode).
func Open(cfg Config, stderr *os.File) (*Logs, error) {
	main := NewOutput(stderr)
	if cfg.File != "" {
		o, err := OpenOutput(cfg.File)
		if err != nil {
			return nil, err
		}
		main = o
	}
	access := main
	if cfg.AccessFile != "" {
		o, err := OpenOutput(cfg.AccessFile)
		if err != nil {
			main.Close()
			return nil, err
		}
		access = o
	}
	return Build(cfg, main, access), nil
}

// Build builds the loggers of cfg over the outputs main and access (the
// same Output when access lines go with the others).
func Build(cfg Config, main, access *Output) *Logs {
	lv := new(slog.LevelVar)
	if l, err := ParseLevel(cfg.Level); err == nil {
		lv.Set(l)
	}
	l := &Logs{Log: New(main, cfg.Format, lv), Level: lv, Main: main, AccessOut: access}
	if cfg.Access {
		alv := new(slog.LevelVar)
		alv.Set(min(lv.Level(), slog.LevelInfo))
		if access == main {
			l.Access = slog.New(WithLevel(l.Log.Handler(), alv))
		} else {
			l.Access = New(access, cfg.Format, alv)
		}
	}
	return l
}

// Reopen reopens the log files (not stderr): see Output.Reopen.
func (l *Logs) Reopen() error {
	err := l.Main.Reopen()
	if l.AccessOut != l.Main {
		if aerr := l.AccessOut.Reopen(); err == nil {
			err = aerr
		}
	}
	return err
}

// Close closes the log files.
func (l *Logs) Close() {
	l.Main.Close()
	if l.AccessOut != l.Main {
		l.AccessOut.Close()
	}
}

// roundDuration rounds d to about two significant digits of its largest
// unit for the text format: 4.3ms, 1.2s, 250µs, 30s.
func roundDuration(d time.Duration) time.Duration {
	for _, unit := range []time.Duration{time.Second, time.Millisecond, time.Microsecond} {
		if d >= unit || -d >= unit {
			return d.Round(unit / 10)
		}
	}
	return d
}

// jsonAttr is the JSON handler's ReplaceAttr: durations as seconds, a
// number ("duration":0.0043), not slog's nanoseconds.
func jsonAttr(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		a.Value = slog.Float64Value(a.Value.Duration().Seconds())
	}
	return a
}

// levelHandler is a handler with a level of its own over another one.
type levelHandler struct {
	h     slog.Handler
	level slog.Leveler
}

// WithLevel returns a handler that writes through h the records at level
// or above, whatever h's own level: the access log, written where the
// other lines go (and with their attributes) but not governed by
// log.level. It relies on h checking its level in Enabled only, as slog's
// handlers and tint do.
func WithLevel(h slog.Handler, level slog.Leveler) slog.Handler {
	return &levelHandler{h: h, level: level}
}

// Enabled implements slog.Handler.
func (l *levelHandler) Enabled(_ context.Context, level slog.Level) bool {
	return level >= l.level.Level()
}

// Handle implements slog.Handler.
func (l *levelHandler) Handle(ctx context.Context, r slog.Record) error {
	return l.h.Handle(ctx, r)
}

// WithAttrs implements slog.Handler.
func (l *levelHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &levelHandler{h: l.h.WithAttrs(as), level: l.level}
}

// WithGroup implements slog.Handler.
func (l *levelHandler) WithGroup(name string) slog.Handler {
	return &levelHandler{h: l.h.WithGroup(name), level: l.level}
}
