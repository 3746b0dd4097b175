package config

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// manyRoutesYAML is a config with n routes, half exact names and half
// "*.suffix" patterns, and n/10 denylist patterns, as an operator with many
// tenants writes it.
func manyRoutesYAML(n int) []byte {
	var b strings.Builder
	b.WriteString("listen_addrs: [\"127.0.0.1:443\"]\nmetrics: {enabled: false}\ndenylist:\n")
	for i := range n / 10 {
		fmt.Fprintf(&b, "  - \"blocked%d.example.net\"\n", i)
	}
	b.WriteString("routes:\n")
	for i := range n {
		if i%2 == 0 {
			fmt.Fprintf(&b, "  - match: \"tenant%d.example.com\"\n    backend: \"10.%d.%d.%d:8443\"\n", i, i>>16&255, i>>8&255, i&255)
		} else {
			fmt.Fprintf(&b, "  - match: \"*.tenant%d.example.org\"\n    backend: \"backend%d.internal\"\n", i, i)
		}
	}
	return []byte(b.String())
}

// TestLoadManyRoutes loads a config with 100,000 routes, as a reload does:
// the master loads and checks the file, then each worker parses the
// effective YAML it is sent. It logs how long each step takes (run with -v);
// it asserts no time, only that every route survives both steps.
func TestLoadManyRoutes(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: 100,000 routes")
	}
	const n = 100_000
	path := filepath.Join(t.TempDir(), "sniproxy.yaml")
	if err := os.WriteFile(path, manyRoutesYAML(n), 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c, err := Load(path, []string{})
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	loaded := time.Since(start)
	if len(c.Routes) != n || len(c.Denylist) != n/10 {
		t.Fatalf("Load: got %d routes and %d denylist patterns; want %d and %d", len(c.Routes), len(c.Denylist), n, n/10)
	}
	if got, want := c.Routes[n-1], (Route{Match: fmt.Sprintf("*.tenant%d.example.org", n-1), Backend: fmt.Sprintf("backend%d.internal", n-1)}); got != want {
		t.Errorf("last route: got %+v; want %+v", got, want)
	}
	start = time.Now()
	y, err := c.YAML()
	if err != nil {
		t.Fatalf("YAML: %v", err)
	}
	printed := time.Since(start)
	start = time.Now()
	c2, err := Parse(y, []string{})
	if err != nil {
		t.Fatalf("Parse(YAML()): %v", err)
	}
	parsed := time.Since(start)
	if len(c2.Routes) != n || c2.Routes[n-1] != c.Routes[n-1] {
		t.Errorf("Parse(YAML()): got %d routes; want %d, the last unchanged", len(c2.Routes), n)
	}
	t.Logf("%d routes, %d denylist patterns: Load+check %v, YAML %v, Parse+check of the YAML %v", n, n/10, loaded, printed, parsed)
}

// yamlWhole is YAML as it was before lists were printed in chunks: the
// whole Config as one document. TestYAMLLongLists compares the two.
func yamlWhole(c *Config) ([]byte, error) { return c.yamlDoc() }

// TestYAMLLongLists checks that printing long lists in chunks gives the
// bytes printing the whole document at once gives, and that they parse
// back to the same lists.
func TestYAMLLongLists(t *testing.T) {
	base, err := Parse([]byte(seed), []string{})
	if err != nil {
		t.Fatal(err)
	}
	odd := []string{"*.example.com", "example.org", "a: b", "'q'", "\"dq\"", "- x", "#c", "", "yes", "1.5", "ünï", "multi\nline", "  pad  "}
	for _, n := range []int{0, 1, listChunk - 1, listChunk, listChunk + 1, 2*listChunk + 500} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			c := *base
			c.Allowlist, c.Denylist, c.Routes = nil, nil, nil
			for i := range n {
				c.Routes = append(c.Routes, Route{Match: odd[i%len(odd)], Backend: fmt.Sprintf("backend%d:%d", i, i%65536)})
				c.Denylist = append(c.Denylist, odd[(i+3)%len(odd)])
			}
			c.Allowlist = odd[:min(n, len(odd))]
			got, err := c.YAML()
			if err != nil {
				t.Fatalf("YAML: %v", err)
			}
			want, err := yamlWhole(&c)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("chunked YAML differs from the whole document:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}
