package config

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
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

// TestLoadManyRoutes loads a config with many routes as a reload does: the
// master loads and checks the file, then each worker parses the effective
// YAML it is sent. Every route must survive both steps. BenchmarkLoad times
// the same steps with 100,000 routes.
func TestLoadManyRoutes(t *testing.T) {
	const n = 5000
	path := filepath.Join(t.TempDir(), "sniproxy.yaml")
	if err := os.WriteFile(path, manyRoutesYAML(n), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path, []string{})
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if len(c.Routes) != n || len(c.Denylist) != n/10 {
		t.Fatalf("Load: got %d routes and %d denylist patterns; want %d and %d", len(c.Routes), len(c.Denylist), n, n/10)
	}
	if got, want := c.Routes[n-1], (Route{Match: fmt.Sprintf("*.tenant%d.example.org", n-1), Backend: fmt.Sprintf("backend%d.internal", n-1)}); !reflect.DeepEqual(got, want) {
		t.Errorf("last route: got %+v; want %+v", got, want)
	}
	y, err := c.YAML()
	if err != nil {
		t.Fatalf("YAML: %v", err)
	}
	c2, err := Parse(y, []string{})
	if err != nil {
		t.Fatalf("Parse(YAML()): %v", err)
	}
	if !reflect.DeepEqual(c2.Routes, c.Routes) || !slices.Equal(c2.Denylist, c.Denylist) {
		t.Errorf("Parse(YAML()): routes or denylist changed")
	}
}

// BenchmarkLoad times the steps of a reload with 1,000 and 100,000 routes
// (and a tenth as many denylist patterns): step=load is Load (read, parse,
// check) of a file in t.TempDir(), step=yaml the master printing the config
// for a worker, step=parse the worker parsing and checking it. Run with
// -benchtime 1x for 100,000 routes.
func BenchmarkLoad(b *testing.B) {
	for _, n := range []int{1000, 100_000} {
		path := filepath.Join(b.TempDir(), "sniproxy.yaml")
		if err := os.WriteFile(path, manyRoutesYAML(n), 0o600); err != nil {
			b.Fatal(err)
		}
		c, err := Load(path, []string{})
		if err != nil {
			b.Fatal(err)
		}
		y, err := c.YAML()
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("routes=%d/step=load", n), func(b *testing.B) {
			for b.Loop() {
				if _, err := Load(path, []string{}); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("routes=%d/step=yaml", n), func(b *testing.B) {
			for b.Loop() {
				if _, err := c.YAML(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("routes=%d/step=parse", n), func(b *testing.B) {
			for b.Loop() {
				if _, err := Parse(y, []string{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
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
