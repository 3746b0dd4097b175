package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func run(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

func TestCheckCommand(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("listen_addrs: [\"127.0.0.1:8443\"]\ntimeouts: {connect: 3}\n"), 0o600)
	out, code := run(t, nil, "check", "-c", good)
	if code != 0 || !strings.Contains(out, "connect: 3s") || !strings.Contains(out, "client_hello: 5s") {
		t.Errorf("check good config: exit %d\n%s", code, out)
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("listen_addrs: [\"127.0.0.1:99999\"]\ncolour: red\nroutes: [{match: \"a.*\", backend: x}]\n"), 0o600)
	out, code = run(t, nil, "check", "-c", bad)
	if code != 1 || !strings.Contains(out, "colour: unknown key") {
		t.Errorf("check unknown key: exit %d\n%s", code, out)
	}
	os.WriteFile(bad, []byte("listen_addrs: [\"127.0.0.1:99999\"]\nroutes: [{match: \"a.*\", backend: x}]\n"), 0o600)
	out, code = run(t, nil, "check", "-c", bad)
	if code != 1 || !strings.Contains(out, "listen_addrs[0]") || !strings.Contains(out, "routes[0].match") {
		t.Errorf("check bad values: exit %d\n%s", code, out)
	}
	// No file: $SNIPROXY_CONFIG, then the embedded default.
	out, code = run(t, []string{"SNIPROXY_CONFIG=" + good}, "check")
	if code != 0 || !strings.Contains(out, good) {
		t.Errorf("check via SNIPROXY_CONFIG: exit %d\n%s", code, out)
	}
	out, code = run(t, []string{"SNIPROXY_CONFIG=", "SNIPROXY_MAX_CONNECTIONS=500"}, "check")
	if _, err := os.Stat("/etc/sniproxy/config.yaml"); err == nil {
		t.Fatal("/etc/sniproxy/config.yaml exists on this machine; the embedded-default case cannot be tested")
	}
	if code != 0 || !strings.Contains(out, "embedded default") || !strings.Contains(out, "127.0.0.1:8443") || !strings.Contains(out, "max_connections: 500") {
		t.Errorf("check embedded default with an override: exit %d\n%s", code, out)
	}
}

func TestVersionCommand(t *testing.T) {
	out, code := run(t, nil, "version")
	if code != 0 || !strings.HasPrefix(out, "sniproxy ") || !strings.Contains(out, "go1.") {
		t.Errorf("version: exit %d %q", code, out)
	}
	if _, code := run(t, nil, "frobnicate"); code != 2 {
		t.Errorf("unknown command: exit %d; want 2", code)
	}
}

func TestStatusCommand(t *testing.T) {
	cfg := strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t))
	p := startProxy(t, cfg)
	kids := p.workers(t, 2)
	c, err := openEcho(p.addr, "echo.test", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p.waitMetric(t, "sniproxy_connections_active", 1)
	cfgPath := p.cmd.Args[2]
	out, code := run(t, nil, "status", "-c", cfgPath, "--json")
	if code != 0 {
		t.Fatalf("status --json: exit %d\n%s", code, out)
	}
	var st struct {
		PID        int `json:"pid"`
		Generation int `json:"generation"`
		Workers    []struct {
			PID    int   `json:"pid"`
			Ready  bool  `json:"ready"`
			Active int64 `json:"active"`
		} `json:"workers"`
		Totals struct {
			Active int64 `json:"active"`
		} `json:"totals"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if st.PID != p.cmd.Process.Pid || st.Generation != 1 || len(st.Workers) != 2 || st.Totals.Active != 1 {
		t.Errorf("status %+v; want master %d, generation 1, 2 workers, 1 active", st, p.cmd.Process.Pid)
	}
	for _, w := range st.Workers {
		if !w.Ready || (w.PID != kids[0] && w.PID != kids[1]) {
			t.Errorf("worker %+v not one of %v or not ready", w, kids)
		}
	}
	out, code = run(t, nil, "status", "-c", cfgPath)
	if code != 0 || !strings.Contains(out, "SLOT") || !strings.Contains(out, "generation 1") {
		t.Errorf("status: exit %d\n%s", code, out)
	}
	// No master: a clear error and exit 1.
	c.Close()
	p.stop(syscall.SIGTERM, 15*time.Second)
	out, code = run(t, nil, "status", "-c", cfgPath)
	if code != 1 || !strings.Contains(out, "no master answers") {
		t.Errorf("status without a master: exit %d\n%s", code, out)
	}
}

func TestSecondSignalStopsAtOnce(t *testing.T) {
	p := startProxy(t, strings.ReplaceAll(masterConfig, "ECHO", echoBackend(t)))
	c, err := openEcho(p.addr, "echo.test", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitRefused(t, p.addr) // the first signal began the stop
	start := time.Now()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		t.Fatal("master still running 5s after a second SIGTERM (shutdown_timeout is 5s; want at once)")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("stopped %v after the second signal; want at once", d)
	}
	if p.err != nil {
		t.Errorf("exit %v; want 0", p.err)
	}
}

// runSplit runs the binary with args and returns its stdout, its stderr and
// its exit code. A command that should end at once but does not (say, a
// usage error that started the proxy instead) is killed after 20s.
func runSplit(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("sniproxy %q still running after 20s", args)
	}
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errOut.String(), code
}

// helpCommands are the commands the root help lists (and no other), each
// with what its help must mention.
var helpCommands = []struct {
	name     string
	mentions []string
}{
	{"check", []string{"-c, --config FILE", "effective config"}},
	{"completion", []string{"bash", "zsh", "fish"}},
	{"help", []string{"Usage:"}},
	{"reload", []string{"-c, --config FILE", "--pid-file FILE"}},
	{"run", []string{"-c, --config FILE", "SNIPROXY_CONFIG"}},
	{"status", []string{"-c, --config FILE", "--json"}},
	{"version", []string{"--version"}},
}

func TestHelpCommands(t *testing.T) {
	// The root: --help, -h and help print the same text, listing exactly
	// the public commands (not worker, man or __complete).
	root, stderr, code := runSplit(t, nil, "--help")
	if code != 0 || stderr != "" {
		t.Fatalf("--help: exit %d, stderr %q; want 0 and nothing", code, stderr)
	}
	for _, args := range [][]string{{"-h"}, {"help"}} {
		if out, _, code := runSplit(t, nil, args...); code != 0 || out != root {
			t.Errorf("sniproxy %q: exit %d\n%s\nwant 0 and the --help text", args, code, out)
		}
	}
	for _, want := range []string{"-c, --config FILE", "-v, --version", "SNIPROXY_CONFIG"} {
		if !strings.Contains(root, want) {
			t.Errorf("--help does not mention %q:\n%s", want, root)
		}
	}
	_, list, ok := strings.Cut(root, "Available Commands:\n")
	list, _, _ = strings.Cut(list, "\n\n")
	var listed []string
	for _, line := range strings.Split(list, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			listed = append(listed, f[0])
		}
	}
	var want []string
	for _, c := range helpCommands {
		want = append(want, c.name)
	}
	if !ok || strings.Join(listed, " ") != strings.Join(want, " ") {
		t.Errorf("--help lists commands %q; want %q", listed, want)
	}

	for _, c := range helpCommands {
		out, stderr, code := runSplit(t, nil, c.name, "--help")
		if code != 0 || stderr != "" || !strings.Contains(out, "Usage:\n  sniproxy "+c.name) {
			t.Errorf("%s --help: exit %d, stderr %q\n%s", c.name, code, stderr, out)
			continue
		}
		for _, m := range append([]string{"-h, --help"}, c.mentions...) {
			if !strings.Contains(out, m) {
				t.Errorf("%s --help does not mention %q:\n%s", c.name, m, out)
			}
		}
		for _, args := range [][]string{{c.name, "-h"}, {"help", c.name}} {
			if o, _, code := runSplit(t, nil, args...); code != 0 || o != out {
				t.Errorf("sniproxy %q: exit %d\n%s\nwant 0 and the text of %s --help", args, code, o, c.name)
			}
		}
	}
}

func TestVersionFlag(t *testing.T) {
	want, _, code := runSplit(t, nil, "version")
	if code != 0 || !strings.HasPrefix(want, "sniproxy ") {
		t.Fatalf("version: exit %d %q", code, want)
	}
	for _, flag := range []string{"--version", "-v"} {
		if out, stderr, code := runSplit(t, nil, flag); code != 0 || out != want || stderr != "" {
			t.Errorf("%s: exit %d, %q, stderr %q; want 0 and %q", flag, code, out, stderr, want)
		}
	}
}

func TestCLIUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"help", "frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"--frobnicate"}, "unknown flag: --frobnicate"},
		{[]string{"check", "--frobnicate"}, "unknown flag: --frobnicate"},
		{[]string{"check", "--version"}, "unknown flag: --version"},
		{[]string{"run", "extra"}, `unexpected argument "extra"`},
		{[]string{"status", "extra"}, `unexpected argument "extra"`},
		{[]string{"status", "-c"}, "flag needs an argument"},
		{[]string{"reload", "--pid-file"}, "flag needs an argument"},
		{[]string{"completion"}, "accepts 1 arg"},
		{[]string{"completion", "tcsh"}, `invalid argument "tcsh"`},
		{[]string{"version", "extra"}, `unexpected argument "extra"`},
		{[]string{"worker", "--frobnicate"}, "unknown flag: --frobnicate"},
	} {
		stdout, stderr, code := runSplit(t, nil, tc.args...)
		if code != 2 || stdout != "" || !strings.Contains(stderr, tc.msg) || !strings.Contains(stderr, "--help' for usage") {
			t.Errorf("sniproxy %q: exit %d, stdout %q, stderr %q; want exit 2, nothing on stdout, %q and a usage hint on stderr",
				tc.args, code, stdout, stderr, tc.msg)
		}
	}
}

// TestWorkerByHand: the hidden worker command keeps its flags, and without
// the IPC socket a master passes it says so and exits 1.
func TestWorkerByHand(t *testing.T) {
	_, stderr, code := runSplit(t, nil, "worker", "--slot", "1", "--generation", "2", "--sockets", "", "--log-level", "debug", "--log-format", "text")
	if code != 1 || !strings.Contains(stderr, "no IPC connection") {
		t.Errorf("worker without a master: exit %d\n%s\nwant 1 and no IPC connection", code, stderr)
	}
}

func TestCompletion(t *testing.T) {
	dir := t.TempDir()
	for _, shell := range []string{"bash", "zsh", "fish"} {
		out, stderr, code := runSplit(t, nil, "completion", shell)
		if code != 0 || stderr != "" || !strings.Contains(out, "sniproxy") || len(out) < 1000 {
			t.Errorf("completion %s: exit %d, stderr %q, %d bytes", shell, code, stderr, len(out))
		}
		os.WriteFile(filepath.Join(dir, shell), []byte(out), 0o644)
	}
	if out, err := exec.Command("bash", "-n", filepath.Join(dir, "bash")).CombinedOutput(); err != nil {
		t.Errorf("bash -n on the bash completion: %v\n%s", err, out)
	}

	// Every script asks the binary (__complete) for the candidates: the
	// public commands and flags, never the hidden ones.
	out, _, code := runSplit(t, nil, "__complete", "")
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if name, _, _ := strings.Cut(line, "\t"); !strings.HasPrefix(name, ":") {
			names = append(names, name)
		}
	}
	if want := "check completion help reload run status version"; code != 0 || strings.Join(names, " ") != want {
		t.Errorf("__complete \"\": exit %d, %q; want %q", code, names, want)
	}

	// The bash script itself, run the way bash runs it on TAB. Its one
	// outside helper, _get_comp_words_by_ref (from the bash-completion
	// package, not installed everywhere), is replaced by a minimal one.
	script := `_get_comp_words_by_ref() { cur=${COMP_WORDS[COMP_CWORD]}; words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD; }
source "$1"
complete_line() { COMP_WORDS=($1); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); COMP_LINE="$1"; COMP_POINT=${#1}; COMPREPLY=(); __start_sniproxy 2>/dev/null; echo "${COMPREPLY[*]}"; }
complete_line "sniproxy st"
complete_line "sniproxy w"
complete_line "sniproxy status --"
`
	cmd := exec.Command("bash", "-c", script, "bash", filepath.Join(dir, "bash"))
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(binary)+":"+os.Getenv("PATH"))
	got, err := cmd.Output()
	if want := "status\n\n--config --help --json\n"; err != nil || string(got) != want {
		t.Errorf("bash completion of \"sniproxy st\", \"sniproxy w\", \"sniproxy status --\": %v\n%q; want %q", err, got, want)
	}
}

func TestManPages(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "man1")
	// SOURCE_DATE_EPOCH dates the pages, for reproducible packages.
	if out, code := run(t, []string{"SOURCE_DATE_EPOCH=1700000000"}, "man", dir); code != 0 {
		t.Fatalf("man %s: exit %d\n%s", dir, code, out)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, e := range entries {
		files = append(files, e.Name())
	}
	want := "sniproxy-check.1 sniproxy-completion.1 sniproxy-reload.1 sniproxy-run.1 sniproxy-status.1 sniproxy-version.1 sniproxy.1"
	if strings.Join(files, " ") != want {
		t.Errorf("man pages %q; want %q (and none for help, worker, man)", files, want)
	}
	groff, _ := exec.LookPath("groff")
	for _, page := range []struct{ file, title, mentions string }{
		{"sniproxy.1", "SNIPROXY", "sniproxy-reload(1)"},
		{"sniproxy-run.1", "SNIPROXY-RUN", `\fB--config\fP`},
		{"sniproxy-check.1", "SNIPROXY-CHECK", `\fB--config\fP`},
		{"sniproxy-reload.1", "SNIPROXY-RELOAD", `\fB--pid-file\fP`},
		{"sniproxy-status.1", "SNIPROXY-STATUS", `\fB--json\fP`},
		{"sniproxy-version.1", "SNIPROXY-VERSION", "sniproxy(1)"},
		{"sniproxy-completion.1", "SNIPROXY-COMPLETION", "bash"},
	} {
		path := filepath.Join(dir, page.file)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Error(err)
			continue
		}
		th := fmt.Sprintf(`.TH "%s" "1" "Nov 2023" "sniproxy `, page.title)
		if !strings.Contains(string(b), "\n"+th) || !strings.Contains(string(b), page.mentions) {
			t.Errorf("%s: no %q header or no %q:\n%s", page.file, th, page.mentions, b)
		}
		if groff == "" {
			continue
		}
		// -ww -z: all warnings, no output; a page groff complains about is broken.
		out, err := exec.Command(groff, "-man", "-Tutf8", "-ww", "-z", path).CombinedOutput()
		if err != nil || len(out) > 0 {
			t.Errorf("groff on %s: %v\n%s", page.file, err, out)
		}
	}
	// A directory that cannot be made is a failure, not a usage error.
	if out, code := run(t, nil, "man", "/dev/null/man1"); code != 1 || !strings.Contains(out, "/dev/null/man1") {
		t.Errorf("man /dev/null/man1: exit %d\n%s\nwant 1 and the path", code, out)
	}
}
