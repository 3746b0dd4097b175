// Package statuspage serves the master's status page: GET / on the metrics
// address renders one self-contained HTML page (styles and script inline,
// no external asset, font or library) from a status.Status, and GET
// /status.json serves the same Status as JSON, the data `sniproxy status
// --json` prints.
//
// The page is complete without JavaScript: every number, table and chart
// (inline SVG) is rendered on the server. With JavaScript on, the page
// fetches /status.json every few seconds and updates itself in place. A
// Content-Security-Policy with a per-response nonce allows only the page's
// own inline style and script and fetches from the same origin.
package statuspage

import (
	"bytes"
	"crypto/rand"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"html/template"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sniproxy/sniproxy/internal/status"
)

//go:embed assets/page.html
var pageHTML string

//go:embed assets/style.css
var styleCSS string

//go:embed assets/app.js
var appJS string

// RefreshSeconds is how often the page's script refreshes the data.
const RefreshSeconds = 2

// Protocols and Reasons are the label values shown, in order, whether or
// not they have counts yet.
var (
	protocols = []string{"tls", "http", "h2c", "unknown"}
	reasons   = []string{"limit", "per_ip_limit", "proxy_header", "denied", "no_route", "sniff_timeout", "sniff_error", "dial_error"}
)

// Handler serves GET / (the page) and GET /status.json. get is called once
// per request and must be safe for concurrent use. log, if not nil,
// receives rendering errors.
func Handler(get func() status.Status, log *slog.Logger) http.Handler {
	tmpl := template.Must(template.New("page").Funcs(funcs).Parse(pageHTML))
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		nonce := newNonce()
		var buf bytes.Buffer
		err := tmpl.Execute(&buf, view{
			Status:    get(),
			Nonce:     nonce,
			Style:     template.CSS(styleCSS),
			Script:    template.JS(appJS),
			Protocols: protocols,
			Reasons:   reasons,
			Refresh:   RefreshSeconds,
		})
		if err != nil {
			if log != nil {
				log.Error("rendering the status page failed", "err", err)
			}
			http.Error(w, "rendering the status page failed", http.StatusInternalServerError)
			return
		}
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Cache-Control", "no-store")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Content-Security-Policy", fmt.Sprintf(
			"default-src 'none'; style-src 'nonce-%s'; script-src 'nonce-%s'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
			nonce, nonce))
		w.Write(buf.Bytes())
	})
	mux.HandleFunc("GET /status.json", func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("Cache-Control", "no-store")
		h.Set("X-Content-Type-Options", "nosniff")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(get())
	})
	return mux
}

// view is what the page template renders.
type view struct {
	status.Status
	Nonce     string
	Style     template.CSS
	Script    template.JS
	Protocols []string
	Reasons   []string
	Refresh   int
}

func newNonce() string {
	var b [16]byte
	rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:]) // no "+" or "/": html/template would escape them in the attribute
}

var funcs = template.FuncMap{
	"duration": humanDuration,
	"seconds":  func(s float64) string { return humanDuration(time.Duration(s * float64(time.Second))) },
	"num":      func(v any) string { return humanCount(toUint(v)) },
	"bytes":    func(v any) string { return humanBytes(toUint(v)) },
	"rate":     humanRate,
	"format":   format,
	"rejsum":   func(t status.Totals) uint64 { return sum(t.Rejected) },
	"rejrate": func(r status.Rates) float64 {
		var n float64
		for _, v := range r.Rejected {
			n += v
		}
		return n
	},
	"ratebytes": func(r status.Rates) float64 { return r.BytesIn + r.BytesOut },
	"charts":    func() []chart { return charts },
	"when":      func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05 UTC") },
	"iso":       func(t time.Time) string { return t.UTC().Format(time.RFC3339) },
	"since": func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return humanDuration(time.Since(t))
	},
	"spark": sparkPath,
	"series": func(kind string, h []status.Sample) []float64 {
		return series(kind, h)
	},
	"last": func(v []float64) float64 {
		if len(v) == 0 {
			return 0
		}
		return v[len(v)-1]
	},
	"peak": func(v []float64) float64 {
		if len(v) == 0 {
			return 0
		}
		return slices.Max(v)
	},
}

// chart is one of the page's line charts.
type chart struct {
	Kind  string // the series, see series
	Title string
	Unit  string // how its values print: "rate", "count" or "bytes"
}

var charts = []chart{
	{"connections", "new connections / s", "rate"},
	{"active", "active connections", "count"},
	{"rejected", "refused / s", "rate"},
	{"bytes", "bytes / s", "bytes"},
}

// format prints v as unit says (see chart.Unit).
func format(unit string, v float64) string {
	switch unit {
	case "count":
		return humanCount(toUint(v))
	case "bytes":
		return humanBytes(toUint(v))
	default:
		return humanRate(v)
	}
}

// toUint converts the integer and float kinds the page shows to a uint64
// (negative values are 0).
func toUint(v any) uint64 {
	switch x := v.(type) {
	case int:
		return uint64(max(x, 0))
	case int64:
		return uint64(max(x, 0))
	case uint64:
		return x
	case float64:
		if x <= 0 || math.IsNaN(x) {
			return 0
		}
		return uint64(x)
	default:
		return 0
	}
}

// series turns the samples into one chart's values: "connections" and
// "rejected" are per-second rates between consecutive samples, "active" the
// open connections at each sample, "bytes" bytes per second both ways.
func series(kind string, h []status.Sample) []float64 {
	var out []float64
	for i := range h {
		if kind == "active" {
			out = append(out, float64(max(h[i].Active, 0)))
			continue
		}
		if i == 0 {
			continue
		}
		dt := h[i].Time.Sub(h[i-1].Time).Seconds()
		if dt <= 0 {
			continue
		}
		var a, b uint64
		switch kind {
		case "connections":
			a, b = h[i].Connections, h[i-1].Connections
		case "rejected":
			a, b = sum(h[i].Rejected), sum(h[i-1].Rejected)
		case "bytes":
			a, b = h[i].BytesIn+h[i].BytesOut, h[i-1].BytesIn+h[i-1].BytesOut
		}
		if a < b {
			a = b
		}
		out = append(out, float64(a-b)/dt)
	}
	return out
}

func sum(m map[string]uint64) uint64 {
	var n uint64
	for _, v := range m {
		n += v
	}
	return n
}

// Chart geometry, in SVG user units (the SVG scales to its box).
const (
	chartW = 300
	chartH = 60
)

// sparkPath returns the SVG path data of a line chart of v scaled into a
// chartW×chartH box (0 at the bottom, the maximum at the top); "" when v
// has fewer than two points. It returns only numbers and path commands.
func sparkPath(v []float64) string {
	if len(v) < 2 {
		return ""
	}
	top := slices.Max(v)
	if top <= 0 || math.IsNaN(top) || math.IsInf(top, 0) {
		top = 1
	}
	var b strings.Builder
	for i, y := range v {
		if math.IsNaN(y) || math.IsInf(y, 0) || y < 0 {
			y = 0
		}
		x := float64(i) * chartW / float64(len(v)-1)
		py := chartH - 2 - y/top*(chartH-4)
		if i == 0 {
			b.WriteString("M")
		} else {
			b.WriteString(" L")
		}
		b.WriteString(strconv.FormatFloat(x, 'f', 1, 64))
		b.WriteString(" ")
		b.WriteString(strconv.FormatFloat(py, 'f', 1, 64))
	}
	return b.String()
}

func humanDuration(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	case d < 24*time.Hour:
		return d.Round(time.Second).String()
	default:
		days := d / (24 * time.Hour)
		return fmt.Sprintf("%dd%s", days, (d - days*24*time.Hour).Round(time.Minute))
	}
}

func humanCount(n uint64) string {
	s := strconv.FormatUint(n, 10)
	if len(s) <= 3 {
		return s
	}
	var b strings.Builder
	pre := len(s) % 3
	if pre > 0 {
		b.WriteString(s[:pre])
	}
	for i := pre; i < len(s); i += 3 {
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(s[i : i+3])
	}
	return b.String()
}

func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, exp := float64(n), 0
	for v >= unit && exp < 6 {
		v /= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[exp-1])
}

func humanRate(r float64) string {
	switch {
	case r <= 0 || math.IsNaN(r):
		return "0"
	case r < 10:
		return strconv.FormatFloat(r, 'f', 2, 64)
	case r < 1000:
		return strconv.FormatFloat(r, 'f', 1, 64)
	default:
		return humanCount(uint64(r))
	}
}
