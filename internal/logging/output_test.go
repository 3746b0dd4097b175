package logging

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDurations(t *testing.T) {
	var buf bytes.Buffer
	New(&buf, "json", new(slog.LevelVar)).Info("x", "duration", 4321*time.Microsecond, "shutdown_timeout", 30*time.Second)
	var rec map[string]any
	if err := json.Unmarshal(buf.Bytes(), &rec); err != nil {
		t.Fatal(err)
	}
	if rec["duration"] != 0.004321 || rec["shutdown_timeout"] != 30.0 {
		t.Errorf("JSON durations %v, %v; want seconds 0.004321 and 30", rec["duration"], rec["shutdown_timeout"])
	}
	buf.Reset()
	New(&buf, "text", new(slog.LevelVar)).Info("x", "duration", 4321*time.Microsecond, "long", 1234567*time.Millisecond)
	if out := buf.String(); !strings.Contains(out, "duration=4.3ms") || !strings.Contains(out, "long=20m34.6s") {
		t.Errorf("text durations: %s", out)
	}
}

func TestAccessLogLevel(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{Level: "error", Format: "json", File: filepath.Join(dir, "main.log"), Access: true, AccessFile: filepath.Join(dir, "access.log")}
	logs, err := Open(cfg, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer logs.Close()
	logs.Log.Info("hidden")
	logs.Access.Info("connection")
	logs.Access.Debug("moved")
	main, _ := os.ReadFile(cfg.File)
	access, _ := os.ReadFile(cfg.AccessFile)
	if len(main) != 0 || strings.Count(string(access), "\n") != 1 || !strings.Contains(string(access), `"msg":"connection"`) {
		t.Errorf("main %q, access %q; want nothing, then the info access line only", main, access)
	}
	cfg.Access = false
	if off := Build(cfg, logs.Main, logs.AccessOut); off.Access != nil {
		t.Error("log.access false built an access logger")
	}
}

func TestReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.log")
	o, err := OpenOutput(path)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	o.Write([]byte("one\n"))
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	o.Write([]byte("two\n"))
	if err := o.Reopen(); err != nil {
		t.Fatal(err)
	}
	o.Write([]byte("three\n"))
	old, _ := os.ReadFile(path + ".1")
	cur, _ := os.ReadFile(path)
	if string(old) != "one\ntwo\n" || string(cur) != "three\n" {
		t.Errorf("old %q, new %q", old, cur)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != FileMode {
		t.Errorf("reopened file: %v, mode %v", err, st.Mode().Perm())
	}
	if err := NewOutput(os.Stderr).Reopen(); err != nil {
		t.Errorf("reopen of stderr: %v; want nothing done", err)
	}
}

func TestWithLevel(t *testing.T) {
	var buf bytes.Buffer
	lv := new(slog.LevelVar)
	lv.Set(slog.LevelError)
	main := New(&buf, "json", lv).With("worker", 1)
	access := slog.New(WithLevel(main.Handler(), slog.LevelInfo))
	main.Info("hidden")
	access.Debug("hidden too")
	access.Info("connection")
	if out := buf.String(); strings.Count(out, "\n") != 1 || !strings.Contains(out, `"msg":"connection","worker":1`) {
		t.Errorf("got %q; want the access line only, with the main logger's attributes", out)
	}
}
