package master

import (
	"slices"
	"strings"
	"testing"

	"github.com/sniproxy/sniproxy/config"
)

func TestWorkerEnvScrubbed(t *testing.T) {
	got := workerEnv([]string{"PATH=/bin", "TABLEFLIP_HAS_PARENT_7DIU3=1", "NOTIFY_SOCKET=/run/x", "SNIPROXY_WORKERS=2", "LISTEN_FDS=3"})
	want := []string{"PATH=/bin", "SNIPROXY_WORKERS=2"}
	if !slices.Equal(got, want) {
		t.Errorf("got %v; want %v", got, want)
	}
}

func TestForSlot(t *testing.T) {
	s := &socketSet{byAddr: map[string][]socket{}, order: []string{"a:1", "b:2"}}
	for i := range 3 {
		s.byAddr["a:1"] = append(s.byAddr["a:1"], socket{name: "reuseport/a:1/" + string(rune('0'+i))})
	}
	s.byAddr["b:2"] = []socket{{name: "shared/b:2"}}
	names := func(socks []socket) string {
		var n []string
		for _, sk := range socks {
			n = append(n, sk.name)
		}
		return strings.Join(n, " ")
	}
	// Three reuseport sockets over two workers: none left unserved.
	for _, tc := range []struct {
		slot, n int
		want    string
	}{
		{0, 2, "reuseport/a:1/0 reuseport/a:1/2 shared/b:2"},
		{1, 2, "reuseport/a:1/1 shared/b:2"},
		{0, 3, "reuseport/a:1/0 shared/b:2"},
		{0, 1, "reuseport/a:1/0 reuseport/a:1/1 reuseport/a:1/2 shared/b:2"},
	} {
		if got := names(s.forSlot(tc.slot, tc.n)); got != tc.want {
			t.Errorf("forSlot(%d, %d) = %q; want %q", tc.slot, tc.n, got, tc.want)
		}
	}
}

func TestControlSocketPath(t *testing.T) {
	t.Setenv("RUNTIME_DIRECTORY", "/run/sniproxy")
	if got := ControlSocketPath(&config.Config{}); got != "/run/sniproxy/sniproxy.sock" {
		t.Errorf("got %q", got)
	}
	if got := ControlSocketPath(&config.Config{ControlSocket: "/x.sock"}); got != "/x.sock" {
		t.Errorf("got %q", got)
	}
}
