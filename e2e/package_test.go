package e2e

import (
	"bytes"
	"debug/elf"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// TestDebianPackage builds the .deb with packaging/build-deb.sh as a
// release would, then checks it as dpkg and an operator would see it: the
// metadata, the files and conffiles, the maintainer scripts, the unit
// (systemd-analyze verify), and the extracted binary running version and
// check on the shipped config.
func TestDebianPackage(t *testing.T) {
	for _, tool := range []string{"dpkg-deb", "systemd-analyze", "git"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed; .ci/run installs it", tool)
		}
	}
	const version = "1.2.3~e2e"
	build := exec.Command("../packaging/build-deb.sh")
	build.Env = append(os.Environ(), "SNIPROXY_VERSION="+version)
	var stderr bytes.Buffer
	build.Stderr = &stderr
	out, err := build.Output()
	if err != nil {
		t.Fatalf("build-deb.sh: %v\n%s", err, stderr.String())
	}
	deb := strings.TrimSpace(string(out))
	if strings.Contains(deb, "\n") || !strings.HasSuffix(deb, ".deb") {
		t.Fatalf("build-deb.sh printed %q; want one .deb path", deb)
	}
	abs, _ := filepath.Abs("../dist")
	if filepath.Dir(deb) != abs {
		t.Errorf("package written to %s; want it in %s", deb, abs)
	}
	t.Cleanup(func() { os.Remove(deb) })

	field := func(name string) string {
		t.Helper()
		v, err := exec.Command("dpkg-deb", "-f", deb, name).Output()
		if err != nil {
			t.Fatalf("dpkg-deb -f %s: %v", name, err)
		}
		return strings.TrimSpace(string(v))
	}
	for name, want := range map[string]string{
		"Package":   "sniproxy-go",
		"Version":   version,
		"Conflicts": "sniproxy",
		"Replaces":  "sniproxy",
		"Section":   "net",
	} {
		if got := field(name); got != want {
			t.Errorf("control field %s: got %q; want %q", name, got, want)
		}
	}

	list, err := exec.Command("dpkg-deb", "-c", deb).Output()
	if err != nil {
		t.Fatalf("dpkg-deb -c: %v", err)
	}
	for _, want := range []string{
		"./usr/bin/sniproxy",
		"./lib/systemd/system/sniproxy.service",
		"./etc/sniproxy/config.yaml",
		"./etc/logrotate.d/sniproxy",
		"./usr/lib/sysusers.d/sniproxy.conf",
		"./usr/share/man/man1/sniproxy.1.gz",
		"./usr/share/bash-completion/completions/sniproxy",
		"./usr/share/zsh/vendor-completions/_sniproxy",
		"./usr/share/fish/vendor_completions.d/sniproxy.fish",
	} {
		if !bytes.Contains(list, []byte(want+"\n")) {
			t.Errorf("package lacks %s; it has:\n%s", want, list)
		}
	}

	ctl := t.TempDir()
	if out, err := exec.Command("dpkg-deb", "-e", deb, ctl).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -e: %v\n%s", err, out)
	}
	conffiles, err := os.ReadFile(filepath.Join(ctl, "conffiles"))
	if want := "/etc/logrotate.d/sniproxy\n/etc/sniproxy/config.yaml"; err != nil || sortedLines(string(conffiles)) != want {
		t.Errorf("conffiles: got %q (%v); want %q", conffiles, err, want)
	}
	for _, script := range []string{"postinst", "prerm", "postrm"} {
		path := filepath.Join(ctl, script)
		if out, err := exec.Command("sh", "-n", path).CombinedOutput(); err != nil {
			t.Errorf("%s: sh -n: %v\n%s", script, err, out)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(ctl, "postinst")); !bytes.Contains(b, []byte("sniproxy")) || !bytes.Contains(b, []byte("systemctl reload")) {
		t.Errorf("postinst neither creates the user nor reloads on upgrade:\n%s", b)
	}

	root := t.TempDir()
	if out, err := exec.Command("dpkg-deb", "-x", deb, root).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -x: %v\n%s", err, out)
	}
	bin := filepath.Join(root, "usr/bin/sniproxy")
	if f, err := elf.Open(bin); err != nil {
		t.Errorf("binary: %v", err)
	} else {
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Error("binary is dynamically linked (has PT_INTERP); want a static binary")
			}
		}
		f.Close()
	}
	v, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil || !strings.Contains(string(v), version) {
		t.Errorf("sniproxy version: got %q (%v); want it to name %s", v, err, version)
	}
	cfg := filepath.Join(root, "etc/sniproxy/config.yaml")
	if out, err := exec.Command(bin, "check", "-c", cfg).CombinedOutput(); err != nil {
		t.Errorf("sniproxy check on the shipped config: %v\n%s", err, out)
	}
	assertLoopbackOnly(t, cfg)
	if lr, err := os.ReadFile(filepath.Join(root, "etc/logrotate.d/sniproxy")); err != nil || !bytes.Contains(lr, []byte("USR1")) {
		t.Errorf("logrotate snippet: %v; want a postrotate sending USR1:\n%s", err, lr)
	}

	unit, err := os.ReadFile(filepath.Join(root, "lib/systemd/system/sniproxy.service"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(unit)
	for _, want := range []string{"ExecStart=/usr/bin/sniproxy run", "ExecReload=/usr/bin/sniproxy reload", "User=sniproxy", "Group=sniproxy"} {
		if !strings.Contains(text, want) {
			t.Errorf("packaged unit lacks %q", want)
		}
	}
	if strings.Contains(text, "DynamicUser=") || strings.Contains(text, "/usr/local/") {
		t.Errorf("packaged unit still has DynamicUser= or /usr/local paths:\n%s", text)
	}
	verifyUnit(t, strings.ReplaceAll(text, "/usr/bin/sniproxy", bin))
}

// assertLoopbackOnly fails unless every address the config at path listens
// on (proxy and metrics) is a loopback address: a package must not expose
// anything before the operator edits its config.
func assertLoopbackOnly(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		ListenAddrs []string `yaml:"listen_addrs"`
		Listeners   []struct {
			Address string `yaml:"address"`
		} `yaml:"listeners"`
		Metrics struct {
			Address string `yaml:"address"`
		} `yaml:"metrics"`
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	addrs := append([]string(nil), c.ListenAddrs...)
	for _, l := range c.Listeners {
		addrs = append(addrs, l.Address)
	}
	if c.Metrics.Address != "" {
		addrs = append(addrs, c.Metrics.Address)
	}
	if len(addrs) == 0 {
		t.Fatalf("%s listens nowhere", path)
	}
	for _, a := range addrs {
		ap, err := netip.ParseAddrPort(a)
		if err != nil || !ap.Addr().IsLoopback() {
			t.Errorf("%s listens on %q; the shipped config must be loopback-only", path, a)
		}
	}
}

// sortedLines returns the lines of s, trimmed, sorted and joined by "\n".
func sortedLines(s string) string {
	lines := strings.Fields(s)
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}
