package route

import (
	"errors"
	"fmt"
	"testing"

	"github.com/sniproxy/sniproxy/internal/hostname"
)

func patterns(ss ...string) []hostname.Pattern {
	ps := make([]hostname.Pattern, len(ss))
	for i, s := range ss {
		ps[i] = hostname.MustParsePattern(s)
	}
	return ps
}

func mustRule(t testing.TB, match, backend string) Rule {
	t.Helper()
	p, err := hostname.ParsePattern(match)
	if err != nil {
		t.Fatal(err)
	}
	host, port, err := hostname.ParseBackend(backend)
	if err != nil {
		t.Fatal(err)
	}
	return Rule{Match: p, Host: host, Port: port}
}

func TestDecide(t *testing.T) {
	table := NewTable(
		patterns("evil.example.com", "*.blocked.example.com"),
		[]Rule{
			mustRule(t, "app.example.com", "10.0.0.5:8443"),
			mustRule(t, "*.example.com", "backend.internal"),
			mustRule(t, "evil.example.com", "10.0.0.6:1"), // shadowed by the denylist
			mustRule(t, "127.0.0.1", "[::1]:9000"),
			mustRule(t, "::1", "127.0.0.1:9001"),
			mustRule(t, "unlisted.test", "10.0.0.7"),
		},
		patterns("*.allowed.test", "allowed.test", "127.0.0.2", "10.1"),
	)
	tests := []struct {
		name     string
		port     int
		wantRule int
		wantHost string
		wantPort int
		wantErr  error
	}{
		// Denylist first, even over a route that would match.
		{"evil.example.com", 443, -1, "", 0, ErrDenied},
		{"EVIL.example.com.", 443, -1, "", 0, ErrDenied},
		{"x.blocked.example.com", 443, -1, "", 0, ErrDenied},
		// Routes, first match; port 0 inherits the backend port.
		{"app.example.com", 443, 0, "10.0.0.5", 8443, nil},
		{"App.Example.Com", 443, 0, "10.0.0.5", 8443, nil},
		{"www.example.com", 443, 1, "backend.internal", 443, nil},
		{"www.example.com", 8443, 1, "backend.internal", 8443, nil},
		{"blocked.example.com", 443, 1, "backend.internal", 443, nil}, // deny is "*.blocked", not itself
		// Route beats allowlist.
		{"unlisted.test", 80, 5, "10.0.0.7", 80, nil},
		// IP literals: a route may match; DNS routing refuses them.
		{"127.0.0.1", 443, 3, "::1", 9000, nil},
		{"[::1]", 443, 4, "127.0.0.1", 9001, nil},
		{"::1", 443, 4, "127.0.0.1", 9001, nil},
		{"127.0.0.2", 443, -1, "", 0, ErrDenied}, // allowlisted, still refused
		{"10.1", 443, -1, "", 0, ErrDenied},
		// Allowlist.
		{"a.allowed.test", 443, -1, "a.allowed.test", 443, nil},
		{"allowed.test", 8443, -1, "allowed.test", 8443, nil},
		{"Allowed.Test.", 443, -1, "allowed.test", 443, nil},
		{"other.test", 443, -1, "", 0, ErrDenied},
		{"xallowed.test", 443, -1, "", 0, ErrDenied},
		// No name, not a name, no port.
		{"", 443, -1, "", 0, ErrNoRoute},
		{".", 443, -1, "", 0, ErrNoRoute},
		{"a..allowed.test", 443, -1, "", 0, ErrNoRoute},
		{"a b.allowed.test", 443, -1, "", 0, ErrNoRoute},
		{"a\x00.allowed.test", 443, -1, "", 0, ErrNoRoute},
		{"a.allowed.test:443", 443, -1, "", 0, ErrNoRoute},
		{"a.allowed.test", 0, -1, "", 0, ErrNoRoute},
		{"www.example.com", 0, -1, "", 0, ErrNoRoute},
		{"a.allowed.test", 65536, -1, "", 0, ErrNoRoute},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s:%d", tt.name, tt.port), func(t *testing.T) {
			got, err := table.Decide(tt.name, tt.port)
			if !errors.Is(err, tt.wantErr) || (err == nil) != (tt.wantErr == nil) {
				t.Fatalf("Decide(%q, %d): got error %v; want %v", tt.name, tt.port, err, tt.wantErr)
			}
			if got.Rule != tt.wantRule {
				t.Errorf("Rule: got %d; want %d", got.Rule, tt.wantRule)
			}
			if err != nil {
				if want := reasonOf(tt.wantErr); got.Reason != want {
					t.Errorf("Reason: got %q; want %q", got.Reason, want)
				}
				return
			}
			if got.Host != tt.wantHost || got.Port != tt.wantPort {
				t.Errorf("backend: got %s:%d; want %s:%d", got.Host, got.Port, tt.wantHost, tt.wantPort)
			}
			if got.Reason != "" {
				t.Errorf("Reason: got %q; want empty", got.Reason)
			}
		})
	}
}

func TestDecideEmptyTable(t *testing.T) {
	for _, table := range []*Table{nil, {}, NewTable(nil, nil, nil)} {
		got, err := table.Decide("Example.COM.", 443)
		if err != nil {
			t.Fatalf("Decide: got error %v; want nil", err)
		}
		want := Decision{Rule: -1, Host: "example.com", Port: 443, Name: "example.com"}
		if got != want {
			t.Errorf("Decide: got %+v; want %+v", got, want)
		}
		if _, err := table.Decide("127.0.0.1", 443); !errors.Is(err, ErrDenied) {
			t.Errorf("Decide(127.0.0.1): got error %v; want %v", err, ErrDenied)
		}
	}
}

func FuzzDecide(f *testing.F) {
	for _, s := range []string{"", "example.com", "a.allowed.test.", "127.1", "[::1]", "x..y", "*.x", "ünï.com", "evil.example.com"} {
		f.Add(s, 443)
	}
	table := NewTable(
		patterns("evil.example.com"),
		[]Rule{{Match: hostname.MustParsePattern("*.example.com"), Host: "backend"}},
		patterns("*.allowed.test", "*.example.com", "example.com"),
	)
	f.Fuzz(func(t *testing.T, name string, port int) {
		dec, err := table.Decide(name, port)
		if err != nil {
			if dec.Reason == "" || dec.Reason != reasonOf(err) || dec.Rule != -1 {
				t.Fatalf("Decide(%q, %d): error %v with %+v", name, port, err, dec)
			}
			return
		}
		if dec.Reason != "" || dec.Host == "" || dec.Port < 1 || dec.Port > 65535 {
			t.Fatalf("Decide(%q, %d): bad decision %+v", name, port, dec)
		}
		if hostname.MustParsePattern("evil.example.com").Match(dec.Name) {
			t.Fatalf("Decide(%q): denied name routed: %+v", name, dec)
		}
		if dec.Rule == -1 && (hostname.Problem(dec.Host) != "" || hostname.IsAddress(dec.Host)) {
			t.Fatalf("Decide(%q): DNS-routed host %q is not a DNS name", name, dec.Host)
		}
	})
}

// reasonOf is the tests' oracle: it maps an error from Table.Decide or
// Dialer.Dial to its metric reason: "" for nil, ReasonDenied for ErrDenied
// and ErrPrivate, ReasonNoRoute for ErrNoRoute, ReasonDialError otherwise.
func reasonOf(err error) Reason {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrDenied), errors.Is(err, ErrPrivate):
		return ReasonDenied
	case errors.Is(err, ErrNoRoute):
		return ReasonNoRoute
	default:
		return ReasonDialError
	}
}
