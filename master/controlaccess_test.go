package master

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/peercred"
)

// Only a root master with an explicit `group` opens the control socket to
// a group, and never to the workers' user.
func TestControlGroup(t *testing.T) {
	parse := func(y string) *config.Config { return parseListening(t, y) }
	cred := &syscall.Credential{Uid: 65534, Gid: 4}
	if g := controlGroup(parse("user: \"65534\"\ngroup: \"4\"\n"), cred, 0); g == nil || g.GID != 4 || g.Except != 65534 {
		t.Errorf("root, user and group: %+v; want gid 4 except uid 65534", g)
	}
	primary := &syscall.Credential{Uid: 65534, Gid: 65534}
	if g := controlGroup(parse("user: \"65534\"\n"), primary, 0); g != nil {
		t.Errorf("root, user with its primary group: %+v; want none", g)
	}
	if g := controlGroup(parse(""), nil, 0); g != nil {
		t.Errorf("root, no user: %+v; want none", g)
	}
	if g := controlGroup(parse("user: \"65534\"\ngroup: \"4\"\n"), nil, 65534); g != nil {
		t.Errorf("not root: %+v; want none", g)
	}
}

// controlAccess: with a group, the socket is 0660 of that group when the
// group can reach it (a configured path in a directory it may search; a
// default directory it is let into), else 0600 with a warning; without
// one, 0600 again (a reload that drops `group`).
func TestControlAccess(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root to give a file to any group (CI and the dev machine run as root)")
	}
	const gid = 4242
	g := &peercred.Group{GID: gid, Except: 65534}
	base, err := os.MkdirTemp("", "sniproxy-ctl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	bind := func(dir string, perm os.FileMode) string {
		t.Helper()
		d := filepath.Join(base, dir)
		os.Mkdir(d, perm)
		os.Chmod(d, perm)
		path := filepath.Join(d, "sniproxy.sock")
		ln, err := listenControl("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		return path
	}
	stat := func(p string) (os.FileMode, uint32) {
		t.Helper()
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t).Gid
	}
	for _, tc := range []struct {
		name       string
		dirPerm    os.FileMode
		configured bool
		wantSock   os.FileMode // and the policy serves the group iff 0660
		wantDir    os.FileMode
		wantLog    string
	}{
		{"configured, in a directory the group may search", 0o755, true, 0o660, 0o755, "open to a group"},
		{"configured, in a private directory", 0o700, true, 0o600, 0o700, "the group cannot reach it"},
		{"default directory, private", 0o700, false, 0o660, 0o710, "let the group into its directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := bind(strings.ReplaceAll(tc.name, " ", "_"), tc.dirPerm)
			var logs bytes.Buffer
			pol := controlAccess(slog.New(slog.NewTextHandler(&logs, nil)), path, g, "ops", tc.configured)
			perm, sgid := stat(path)
			if perm != tc.wantSock {
				t.Errorf("socket %v; want %v", perm, tc.wantSock)
			}
			if open := tc.wantSock == 0o660; open != (pol.Group != nil) || (open && sgid != gid) {
				t.Errorf("socket gid %d, policy group %+v; want the group iff 0660", sgid, pol.Group)
			}
			if perm, _ := stat(filepath.Dir(path)); perm != tc.wantDir {
				t.Errorf("directory %v; want %v", perm, tc.wantDir)
			}
			if !strings.Contains(logs.String(), tc.wantLog) {
				t.Errorf("log %q; want %q", logs.String(), tc.wantLog)
			}
			// A later generation without `group` closes it again.
			if pol := controlAccess(quietLog(), path, nil, "", tc.configured); pol.Group != nil {
				t.Errorf("no group: policy %+v", pol)
			}
			if perm, sgid := stat(path); perm != 0o600 || sgid != uint32(os.Getegid()) {
				t.Errorf("no group: socket %v gid %d; want 0600 gid %d", perm, sgid, os.Getegid())
			}
		})
	}
}

// The per-user temp directory (the last default) is never opened to the
// group: the socket in it stays 0600.
func TestControlAccessUserTempDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root to give a file to any group (CI and the dev machine run as root)")
	}
	t.Setenv("TMPDIR", t.TempDir())
	path := filepath.Join(peercred.UserTempDir(), "sniproxy.sock")
	ln, err := listenControl("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var logs bytes.Buffer
	pol := controlAccess(slog.New(slog.NewTextHandler(&logs, nil)), path, &peercred.Group{GID: 4242, Except: 65534}, "ops", false)
	if pol.Group != nil {
		t.Errorf("policy %+v; want root and this user only", pol)
	}
	for _, p := range []string{path, filepath.Dir(path)} {
		fi, _ := os.Stat(p)
		if want := map[bool]os.FileMode{true: 0o600, false: 0o700}[p == path]; fi.Mode().Perm() != want {
			t.Errorf("%s: %v; want %v", p, fi.Mode().Perm(), want)
		}
	}
	if !strings.Contains(logs.String(), "is private to this user") {
		t.Errorf("log %q; want the reason", logs.String())
	}
}

// A client that may not write in RunDir uses the socket there only when it
// has none of its own in its temp directory.
func TestClientUsesDir(t *testing.T) {
	own := filepath.Join(peercred.UserTempDir(), "sniproxy.sock")
	run := filepath.Join(RunDir, "sniproxy.sock")
	for _, tc := range []struct {
		name     string
		writable bool
		sockets  []string
		want     bool
	}{
		{"writable", true, nil, true},
		{"a root master's socket", false, []string{run}, true},
		{"no socket there", false, nil, false},
		{"a master of its own too", false, []string{run, own}, false},
	} {
		got := clientUsesDir(RunDir, func(string) bool { return tc.writable }, func(p string) bool {
			return slices.Contains(tc.sockets, p)
		})
		if got != tc.want {
			t.Errorf("%s: %v; want %v", tc.name, got, tc.want)
		}
	}
}
