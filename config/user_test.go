package config

import (
	"os/user"
	"strings"
	"testing"
)

func TestWorkerCredentials(t *testing.T) {
	root, err := user.Lookup("root")
	if err != nil {
		t.Fatalf("no root user: %v", err)
	}
	c, err := Parse([]byte("listen_addrs: [\"127.0.0.1:1\"]\nuser: root\n"), []string{})
	if err != nil {
		t.Fatal(err)
	}
	cr, err := c.WorkerCredentials()
	if err != nil || cr == nil || cr.UID != 0 || cr.Name != "root" || len(cr.Groups) == 0 {
		t.Errorf("root: %+v, %v (root is uid %s)", cr, err, root.Uid)
	}
	c, err = Parse([]byte("listen_addrs: [\"127.0.0.1:1\"]\nuser: \"0\"\ngroup: \"0\"\n"), []string{})
	if err != nil {
		t.Fatalf("numeric user and group: %v", err)
	}
	if cr, _ := c.WorkerCredentials(); cr.UID != 0 || cr.GID != 0 {
		t.Errorf("numeric: %+v", cr)
	}
	if c, _ := Parse([]byte("listen_addrs: [\"127.0.0.1:1\"]\n"), []string{}); c != nil {
		if cr, err := c.WorkerCredentials(); cr != nil || err != nil {
			t.Errorf("no user: %+v, %v; want nil, nil", cr, err)
		}
	}
	for _, tt := range []struct{ yaml, key string }{
		{"user: no-such-user-xyz\n", "user: "},
		{"user: root\ngroup: no-such-group-xyz\n", "group: "},
		{"group: root\n", "group: "},
	} {
		_, err := Parse([]byte("listen_addrs: [\"127.0.0.1:1\"]\n"+tt.yaml), []string{})
		if err == nil || !strings.Contains(err.Error(), tt.key) {
			t.Errorf("%q: got %v; want an error at %s", tt.yaml, err, tt.key)
		}
	}
}
