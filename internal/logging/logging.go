// Package logging builds sniproxy's slog.Logger: lmittmann/tint with colours
// on a terminal, JSON lines otherwise.
package logging

import (
	"encoding"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"
	"unicode/utf8"

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
// colours unless w is a terminal. Durations are seconds (a number) in JSON
// and rounded human units (4.3ms) in text.
func New(w io.Writer, format string, level *slog.LevelVar) *slog.Logger {
	tty := isTerminal(w)
	switch format {
	case "json":
	case "text":
		return slog.New(newText(w, level, time.RFC3339Nano, tty))
	default:
		if tty {
			return slog.New(newText(w, level, time.TimeOnly, true))
		}
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level, ReplaceAttr: jsonAttr}))
}

// newText returns the tint handler writing to w, with ANSI colours if
// colour. Control characters in the message, keys and values are escaped
// (see escapeAttr): values such as a Host header or an error quoting one
// come from clients, and tint writes an ESC in a value as it is.
func newText(w io.Writer, level slog.Leveler, timeFormat string, colour bool) slog.Handler {
	return tint.NewTextHandler(w, &tint.Options{
		Level:       level,
		TimeFormat:  timeFormat,
		NoColor:     !colour,
		ReplaceAttr: escapeAttr,
	})
}

// escapeAttr is tint's ReplaceAttr: it returns a with control characters
// in its key and value escaped by escapeControls. tint calls it for the
// message and for every attribute (those of WithAttrs and inside groups
// too) after resolving LogValuers and its own colour wrapper, so an
// attribute keeps its colour. Values of kind Any other than a slog.Level
// or *slog.Source are turned into the string tint would print (the
// MarshalText of an encoding.TextMarshaler, else %+v, which is Error for
// an error and String for a fmt.Stringer) and escaped; []byte values tint
// quotes itself. Numbers, booleans, durations and times have no controls.
func escapeAttr(_ []string, a slog.Attr) slog.Attr {
	a.Key = escapeControls(a.Key)
	switch a.Value.Kind() {
	case slog.KindDuration:
		a.Value = slog.DurationValue(roundDuration(a.Value.Duration()))
	case slog.KindString:
		a.Value = slog.StringValue(escapeControls(a.Value.String()))
	case slog.KindAny:
		var s string
		switch v := a.Value.Any().(type) {
		case slog.Level, *slog.Source, []byte, nil:
			return a
		case encoding.TextMarshaler:
			b, err := v.MarshalText()
			if err != nil {
				return a // tint prints nothing for it
			}
			s = string(b)
		default:
			s = fmt.Sprintf("%+v", v)
		}
		a.Value = slog.StringValue(escapeControls(s))
	}
	return a
}

// escapeControls returns s with every C0 control (ESC, CR, LF and TAB
// included), DEL and C1 control replaced by a \u00XX escape, every byte
// that is not UTF-8 by a \xXX escape, and the backslash of the text
// "\x1b" by \u005c, since tint turns that text into an ESC when it quotes
// a value with colours on. It returns s itself, without allocating, when
// there is nothing to escape.
func escapeControls(s string) string {
	const hex = "0123456789abcdef"
	var b []byte // nil until the first escape
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		var esc string
		switch {
		case r == utf8.RuneError && size == 1:
			esc = "\\x" + string(hex[s[i]>>4]) + string(hex[s[i]&0xf])
		case r < 0x20, r == 0x7f, 0x80 <= r && r <= 0x9f:
			esc = "\\u00" + string(hex[r>>4]) + string(hex[r&0xf])
		case r == '\\' && strings.HasPrefix(s[i+1:], "x1b"):
			esc = "\\u005c"
		default:
			if b != nil {
				b = append(b, s[i:i+size]...)
			}
			i += size
			continue
		}
		if b == nil {
			b = make([]byte, 0, len(s)+16)
			b = append(b, s[:i]...)
		}
		b = append(b, esc...)
		i += size
	}
	if b == nil {
		return s
	}
	return string(b)
}

// isTerminal reports whether w is a character device such as a terminal.
func isTerminal(w io.Writer) bool {
	if a, ok := w.(*Async); ok {
		return isTerminal(a.w)
	}
	if o, ok := w.(*Output); ok {
		return o.tty
	}
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0 && os.Getenv("TERM") != "dumb"
}
