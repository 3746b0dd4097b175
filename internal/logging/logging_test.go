package logging

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/lmittmann/tint"
)

// hostile are client-chosen strings that try to reach a terminal: colour
// and title sequences (ESC, quoted and unquoted by tint), a literal
// backslash-x1b text that tint turns into ESC when it quotes a value with
// colours on, a forged line, an 8-bit CSI as a C1 rune and as a raw byte.
var hostile = []string{
	"\x1b[31mred\x1b[0m",
	"\x1b]0;title\x07 x",
	`\x1b[2J x`,
	`a\\x1b[2J`,
	"a\r\ntime=forged level=ERROR",
	"\u009b31m",
	"\x9b31m x",
	"tab\there\x00\x7f",
}

// stringer is a fmt.Stringer with a client-chosen String.
type stringer string

func (s stringer) String() string { return string(s) }

// logAll logs v through h every way a client-chosen value reaches a
// handler: message, string attribute, tinted error, plain error, Stringer,
// an arbitrary value, WithAttrs and a group.
func logAll(h slog.Handler, v string) {
	l := slog.New(h)
	l.Info(v, "name", v)
	l.Warn("m", tint.Err(errors.New(v)))
	l.Warn("m", "err", fmt.Errorf("wrapped: %w", errors.New(v)))
	l.Info("m", "alpn", stringer(v))
	l.Info("m", "any", struct{ S string }{v})
	l.With("host", v).Info("m")
	l.Info("m", slog.Group("g", "v", v))
}

// checkClean fails t if out holds a control byte or rune other than the
// newline that ends each line and escapes, or a byte that is not UTF-8. It
// returns how many ESC bytes out holds.
func checkClean(t *testing.T, v string, out []byte) int {
	t.Helper()
	if !utf8.Valid(out) {
		t.Errorf("value %q: output is not UTF-8: %q", v, out)
	}
	esc := 0
	for _, r := range string(out) {
		switch {
		case r == 0x1b:
			esc++
		case r == '\n':
		case r < 0x20, r == 0x7f, 0x80 <= r && r <= 0x9f:
			t.Errorf("value %q: control %U in output %q", v, r, out)
		}
	}
	return esc
}

// TestTextEscapesControls logs hostile values through the text handler
// with colours on and off: the only control bytes in the output are the
// newlines ending lines and, with colours, tint's own colour codes, as many
// ESC bytes as a harmless value of the same length gives.
func TestTextEscapesControls(t *testing.T) {
	for _, colour := range []bool{true, false} {
		for _, v := range hostile {
			var got, ref bytes.Buffer
			logAll(newText(&got, slog.LevelInfo, time.RFC3339, colour), v)
			logAll(newText(&ref, slog.LevelInfo, time.RFC3339, colour), strings.Repeat("x", len(v)))
			gotEsc := checkClean(t, v, got.Bytes())
			refEsc := checkClean(t, v, ref.Bytes())
			if gotEsc != refEsc {
				t.Errorf("colour %v, value %q: %d ESC bytes; want tint's own %d\n%s", colour, v, gotEsc, refEsc, got.Bytes())
			}
			if n := bytes.Count(got.Bytes(), []byte("\n")); n != 7 {
				t.Errorf("colour %v, value %q: %d lines; want 7\n%s", colour, v, n, got.Bytes())
			}
		}
	}
}

// TestTextShowsEscapes checks that an escaped value stays readable: the
// control characters are shown as escapes, the rest as it was.
func TestTextShowsEscapes(t *testing.T) {
	var out bytes.Buffer
	slog.New(newText(&out, slog.LevelInfo, time.RFC3339, true)).Info("m", "name", "\x1b[31mred")
	if want := `\u001b[31mred`; !strings.Contains(out.String(), want) {
		t.Errorf("output %q lacks %q", out.String(), want)
	}
}

func TestEscapeControls(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ""},
		{"www.example.com", "www.example.com"},
		{"caf\u00e9 \u2603", "caf\u00e9 \u2603"},
		{"\x1b[31m", `\u001b[31m`},
		{"a\r\nb\tc\x00\x7f", `a\u000d\u000ab\u0009c\u0000\u007f`},
		{"\u0085\u009b\u00a0", `\u0085\u009b` + "\u00a0"},
		{"\x9b\xff", `\x9b\xff`},
		// tint turns the text \x1b back into ESC when it quotes a value
		// with colours on: the backslash is escaped.
		{`\x1b`, `\u005cx1b`},
		{`\\x1b`, `\\u005cx1b`},
		{`\x1c \X1B \x1`, `\x1c \X1B \x1`},
	}
	for _, tt := range tests {
		if got := escapeControls(tt.in); got != tt.want {
			t.Errorf("escapeControls(%q) = %q; want %q", tt.in, got, tt.want)
		}
	}
	// No allocation when there is nothing to escape.
	if n := testing.AllocsPerRun(100, func() { escapeControls("www.example.com") }); n != 0 {
		t.Errorf("escapeControls of a clean string: %v allocations; want 0", n)
	}
}

// TestJSONEscapesControls checks what the JSON handler already does:
// encoding/json-style escaping of C0 controls (ESC included), so no
// control byte reaches the output.
func TestJSONEscapesControls(t *testing.T) {
	for _, v := range hostile {
		var out bytes.Buffer
		l := New(&out, "json", new(slog.LevelVar))
		logAll(l.Handler(), v)
		for _, c := range out.Bytes() {
			if c < 0x20 && c != '\n' {
				t.Errorf("value %q: byte %#x in JSON output %q", v, c, out.Bytes())
				break
			}
		}
	}
}

// TestNewLevel checks that New's handlers follow the LevelVar.
func TestNewLevel(t *testing.T) {
	for _, format := range []string{"json", "text", "auto"} {
		var out bytes.Buffer
		lv := new(slog.LevelVar)
		lv.Set(slog.LevelWarn)
		l := New(&out, format, lv)
		if l.Handler().Enabled(context.Background(), slog.LevelInfo) {
			t.Errorf("%s: info enabled at level warn", format)
		}
		lv.Set(slog.LevelDebug)
		if !l.Handler().Enabled(context.Background(), slog.LevelDebug) {
			t.Errorf("%s: debug disabled at level debug", format)
		}
	}
}
