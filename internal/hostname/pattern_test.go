package hostname

import (
	"strings"
	"testing"
)

func TestParsePatternMatch(t *testing.T) {
	tests := []struct {
		pattern string
		canon   string
		match   []string
		nomatch []string
	}{
		{"example.com", "example.com",
			[]string{"example.com"},
			[]string{"www.example.com", "example.org", "xexample.com", "example.co", "com", ""}},
		{"*.example.com", "*.example.com",
			[]string{"www.example.com", "a.b.example.com", "x-y.example.com"},
			[]string{"example.com", "xexample.com", ".example.com", "www.example.org", "example.com.evil"}},
		{"EXAMPLE.Com", "example.com", []string{"example.com"}, []string{"EXAMPLE.Com"}},
		{"*.Example.COM.", "*.example.com", []string{"a.example.com"}, []string{"example.com"}},
		{"example.com.", "example.com", []string{"example.com"}, []string{"example.com."}},
		{"*.com", "*.com", []string{"example.com"}, []string{"com"}},
		{"localhost", "localhost", []string{"localhost"}, []string{"a.localhost"}},
		{"_acme.example.com", "_acme.example.com", []string{"_acme.example.com"}, nil},
		{"xn--bcher-kva.example", "xn--bcher-kva.example", []string{"xn--bcher-kva.example"}, nil},
		{"127.0.0.1", "127.0.0.1", []string{"127.0.0.1"}, []string{"127.0.0.2", "127.1", "x.127.0.0.1"}},
		{"::1", "::1", []string{"::1", "[::1]", "0:0::1", "0:0:0:0:0:0:0:1"}, []string{"::2", "127.0.0.1", "[::1"}},
		{"[2001:DB8::1]", "2001:db8::1", []string{"2001:db8::1", "[2001:db8:0::1]"}, []string{"2001:db8::2"}},
		{"127.1", "127.1", []string{"127.1"}, []string{"127.0.0.1"}},
		{strings.Repeat("a", 63) + ".com", strings.Repeat("a", 63) + ".com", []string{strings.Repeat("a", 63) + ".com"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.pattern, func(t *testing.T) {
			p, err := ParsePattern(tt.pattern)
			if err != nil {
				t.Fatalf("ParsePattern(%q): got error %v; want nil", tt.pattern, err)
			}
			if got := p.String(); got != tt.canon {
				t.Errorf("String(): got %q; want %q", got, tt.canon)
			}
			for _, n := range tt.match {
				if !p.Match(n) {
					t.Errorf("Match(%q): got false; want true", n)
				}
			}
			for _, n := range tt.nomatch {
				if p.Match(n) {
					t.Errorf("Match(%q): got true; want false", n)
				}
			}
		})
	}
}

func TestParsePatternErrors(t *testing.T) {
	tests := []struct {
		pattern string
		reason  string // substring of the error
	}{
		{"", "empty"},
		{".", "empty"},
		{"*", `"*" alone`},
		{"*.", `"*" alone`},
		{" example.com", "space"},
		{"example.com ", "space"},
		{"a.*.com", `"*" may only be the whole first label`},
		{"*a.com", `"*" may only be the whole first label`},
		{"a*.com", `"*" may only be the whole first label`},
		{"**.com", `"*" may only be the whole first label`},
		{"*.*.com", `"*" may only be the whole first label`},
		{"example.*", `"*" may only be the whole first label`},
		{"*.", `"*" alone`},
		{"..com", "empty label"},
		{"a..com", "empty label"},
		{".example.com", "empty label"},
		{"example.com..", "empty label"},
		{"*..com", "empty label"},
		{"exa mple.com", "invalid character"},
		{"example.com:443", "invalid character"},
		{"example.com/", "invalid character"},
		{"exa\x00mple.com", "invalid character"},
		{"bücher.example", "non-ASCII"},
		{strings.Repeat("a", 64) + ".com", "label longer than 63"},
		{strings.Repeat("a.", 127) + "ab", "name longer than 253"},
		{"fe80::1%eth0", "zone"},
		{"[1.2.3.4]", "invalid character"},
	}
	for _, tt := range tests {
		t.Run(tt.pattern, func(t *testing.T) {
			p, err := ParsePattern(tt.pattern)
			if err == nil {
				t.Fatalf("ParsePattern(%q): got %q, nil; want error containing %q", tt.pattern, p, tt.reason)
			}
			if !strings.Contains(err.Error(), tt.reason) {
				t.Errorf("ParsePattern(%q): got error %q; want it to contain %q", tt.pattern, err, tt.reason)
			}
		})
	}
}

func TestZeroPatternMatchesNothing(t *testing.T) {
	var p Pattern
	for _, n := range []string{"", "example.com", "::1"} {
		if p.Match(n) {
			t.Errorf("Pattern{}.Match(%q): got true; want false", n)
		}
	}
}

func TestIsAddressName(t *testing.T) {
	tests := []struct {
		name string
		want bool
	}{
		{"127.0.0.1", true},
		{"127.1", true},
		{"2130706433", true},
		{"0x7f.1", true},
		{"0x7f000001", true},
		{"0177.0.0.1", true},
		{"1.2.3.4", true},
		{"::1", true},
		{"[::1]", true},
		{"::ffff:127.0.0.1", true},
		{"fe80::1%eth0", true},
		{"foo.0x", true},
		{"example.com", false},
		{"1.2.3.com", false},
		{"0x7f.com", false},
		{"123abc", false},
		{"a.0xg", false},
		{"localhost", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := IsAddress(tt.name); got != tt.want {
				t.Errorf("IsAddress(%q): got %v; want %v", tt.name, got, tt.want)
			}
		})
	}
}

func TestParseBackend(t *testing.T) {
	tests := []struct {
		in       string
		wantHost string
		wantPort int
		wantErr  string // substring; "" = success
	}{
		{"10.0.0.5:8443", "10.0.0.5", 8443, ""},
		{"10.0.0.5", "10.0.0.5", 0, ""},
		{"[::1]:443", "::1", 443, ""},
		{"[::1]", "::1", 0, ""},
		{"::1", "::1", 0, ""},
		{"2001:DB8::1", "2001:db8::1", 0, ""},
		{"[fe80::1%eth0]:443", "fe80::1%eth0", 443, ""},
		{"host", "host", 0, ""},
		{"Backend.Internal:8443", "backend.internal", 8443, ""},
		{"backend.internal.:1", "backend.internal", 1, ""},
		{"backend.internal:65535", "backend.internal", 65535, ""},
		{"", "", 0, "empty"},
		{" host", "", 0, "space"},
		{"host:", "", 0, "empty port"},
		{":443", "", 0, "empty host"},
		{"host:0", "", 0, "out of range"},
		{"host:65536", "", 0, "out of range"},
		{"host:99999999999999999999", "", 0, "out of range"},
		{"host:-1", "", 0, "not a number"},
		{"host:+1", "", 0, "not a number"},
		{"host:https", "", 0, "not a number"},
		{"a:b:c", "", 0, "too many colons"},
		{"[::1]:", "", 0, "empty port"},
		{"[host]:443", "", 0, "brackets"},
		{"ho st:443", "", 0, "invalid character"},
		{"a..b", "", 0, "empty label"},
		{"10.1:443", "", 0, "neither an IP address nor a host name"},
		{"1.2.3.4.5", "", 0, "neither an IP address nor a host name"},
		{"http://host", "", 0, "not a number"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			host, port, err := ParseBackend(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseBackend(%q): got %q, %d, %v; want error containing %q", tt.in, host, port, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseBackend(%q): got error %v; want nil", tt.in, err)
			}
			if host != tt.wantHost || port != tt.wantPort {
				t.Errorf("ParseBackend(%q): got %q, %d; want %q, %d", tt.in, host, port, tt.wantHost, tt.wantPort)
			}
		})
	}
}

func TestPatternKeys(t *testing.T) {
	tests := []struct {
		pattern, name, suffix, addr string
	}{
		{"Example.COM.", "example.com", "", ""},
		{"*.example.com", "", ".example.com", ""},
		{"*.com", "", ".com", ""},
		{"127.1", "127.1", "", ""}, // not an address netip parses: an exact name
		{"127.0.0.1", "", "", "127.0.0.1"},
		{"[2001:DB8::1]", "", "", "2001:db8::1"},
		{"::ffff:1.2.3.4", "", "", "::ffff:1.2.3.4"},
	}
	for _, tt := range tests {
		p := MustParsePattern(tt.pattern)
		a, ok := p.Addr()
		if got := p.Name(); got != tt.name {
			t.Errorf("%q: Name(): got %q; want %q", tt.pattern, got, tt.name)
		}
		if got := p.Suffix(); got != tt.suffix {
			t.Errorf("%q: Suffix(): got %q; want %q", tt.pattern, got, tt.suffix)
		}
		if ok != (tt.addr != "") || (ok && a.String() != tt.addr) {
			t.Errorf("%q: Addr(): got %v, %v; want %q", tt.pattern, a, ok, tt.addr)
		}
	}
	var zero Pattern
	if _, ok := zero.Addr(); zero.Name() != "" || zero.Suffix() != "" || ok {
		t.Errorf("zero Pattern has a key: %q %q %v", zero.Name(), zero.Suffix(), ok)
	}
}

// TestPatternKeysAgreeWithMatch checks the rule the Name doc comment gives
// for matching by key against Match, over every pair of a set of patterns
// and names.
func TestPatternKeysAgreeWithMatch(t *testing.T) {
	pats := []string{"example.com", "*.example.com", "*.com", "a.b.example.com", "*.b.example.com",
		"127.0.0.1", "::1", "::ffff:1.2.3.4", "*.2.3.4", "*.0.0.1", "127.1", "1.2.3.4"}
	names := []string{"example.com", "www.example.com", "a.b.example.com", "x.a.b.example.com", "com",
		"xexample.com", "127.0.0.1", "[::1]", "0:0::1", "::1", "::ffff:1.2.3.4", "1.2.3.4",
		"9.1.2.3.4", "127.1", "x.127.1", "fe80::1%eth0", "[::1", ""}
	byKey := func(p Pattern, name string) bool {
		if name != "" && name == p.Name() {
			return true
		}
		if s := p.Suffix(); s != "" && len(name) > len(s) && strings.HasSuffix(name, s) {
			return true
		}
		pa, ok := p.Addr()
		a, isAddr := ParseIPLiteral(name)
		return ok && isAddr && a == pa
	}
	for _, ps := range pats {
		p := MustParsePattern(ps)
		for _, n := range names {
			if got, want := byKey(p, n), p.Match(n); got != want {
				t.Errorf("pattern %q, name %q: by key %v; Match %v", ps, n, got, want)
			}
		}
	}
}

func TestParseIPLiteral(t *testing.T) {
	tests := []struct {
		in   string
		want string // "" when not an address
	}{
		{"1.2.3.4", "1.2.3.4"},
		{"::1", "::1"},
		{"[::1]", "::1"},
		{"[0:0::1]", "::1"},
		{"::ffff:1.2.3.4", "::ffff:1.2.3.4"},
		{"fe80::1%eth0", "fe80::1%eth0"},
		{"[fe80::1%eth0]", "fe80::1%eth0"},
		{"[1.2.3.4]", ""},
		{"1.2.3.4%eth0", ""},
		{"01.2.3.4", ""},
		{"127.1", ""},
		{"1.2.3.4.", ""},
		{"example.com", ""},
		{"a:b", ""},
		{"[::1", ""},
		{"[]", ""},
		{"", ""},
	}
	for _, tt := range tests {
		a, ok := ParseIPLiteral(tt.in)
		got := ""
		if ok {
			got = a.String()
		}
		if got != tt.want {
			t.Errorf("ParseIPLiteral(%q): got %q, %v; want %q", tt.in, got, ok, tt.want)
		}
	}
}
