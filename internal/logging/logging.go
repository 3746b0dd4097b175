// Package logging builds sniproxy's slog.Logger: lmittmann/tint with colours
// on a terminal, JSON lines otherwise.
package logging

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/lmittmann/tint"
)

// ParseLevel turns a config log.level ("debug", "info", "warn", "error"; ""
// means info) into a slog.Level.
func ParseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "", "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("logging: unknown level %q", s)
}

// New returns a logger writing to w in format "auto", "text" or "json" at
// the level held by level, which the caller may change at any time. "auto"
// means tint on a terminal and JSON otherwise; "text" is tint without
// colours unless w is a terminal.
func New(w io.Writer, format string, level *slog.LevelVar) *slog.Logger {
	tty := isTerminal(w)
	switch format {
	case "json":
	case "text":
		return slog.New(tint.NewTextHandler(w, &tint.Options{Level: level, TimeFormat: time.RFC3339Nano, NoColor: !tty}))
	default:
		if tty {
			return slog.New(tint.NewTextHandler(w, &tint.Options{Level: level, TimeFormat: time.TimeOnly}))
		}
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level}))
}

// isTerminal reports whether w is a character device such as a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0 && os.Getenv("TERM") != "dumb"
}
