package main

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/logging"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `usage:
  sniproxy [run] [-c FILE]   run in the foreground
  sniproxy check [-c FILE]   validate the config and print the effective config
  sniproxy reload [-c FILE] [--pid-file F]
                             upgrade the running master with no downtime and wait
  sniproxy status [-c FILE] [--json]
                             ask the running master for its workers and totals
  sniproxy version           print version, commit and Go version

Without -c the config is $SNIPROXY_CONFIG, else /etc/sniproxy/config.yaml,
else the embedded default. SNIPROXY_<KEY> variables override keys.
`

// run executes the command line args and returns the exit status.
func run(args []string, sigs <-chan os.Signal, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "run":
		return cmdRun(args, sigs, stderr)
	case "check":
		return cmdCheck(args, stdout, stderr)
	case "status":
		return cmdStatus(args, stdout, stderr)
	case "reload":
		return cmdReload(args, stdout, stderr)
	case "worker":
		return cmdWorker(args, stderr)
	case "version":
		fmt.Fprintf(stdout, "sniproxy %s (commit %s, %s)\n", version, commit(), runtime.Version())
		return 0
	case "help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "sniproxy: unknown command %q\n%s", cmd, usage)
	return 2
}

// commit returns the VCS revision the binary was built from, if recorded.
func commit() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return s.Value
			}
		}
	}
	return "unknown"
}

// configFlagSet returns a subcommand's flag set with -c (and --config),
// whose value the returned pointer receives; purpose says what the config
// is used for.
func configFlagSet(name, purpose string, stderr io.Writer) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	usage := "config file"
	if purpose != "" {
		usage += " " + purpose
	}
	path := fs.String("c", "", usage+" (default: $SNIPROXY_CONFIG, /etc/sniproxy/config.yaml, embedded)")
	fs.StringVar(path, "config", "", "same as -c")
	return fs, path
}

// configFlags parses -c for a subcommand that takes nothing else.
func configFlags(name string, args []string, stderr io.Writer) (string, error) {
	fs, path := configFlagSet(name, "", stderr)
	if err := fs.Parse(args); err != nil {
		return "", err
	}
	if fs.NArg() > 0 {
		return "", fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return *path, nil
}

// loadConfig resolves and loads the config for a subcommand.
func loadConfig(path string) (*config.Config, error) {
	return config.Load(config.Resolve(path, nil, nil), nil)
}

func cmdCheck(args []string, stdout, stderr io.Writer) int {
	path, err := configFlags("check", args, stderr)
	if err != nil {
		return 2
	}
	cfg, err := loadConfig(path)
	if err != nil {
		fmt.Fprintf(stderr, "sniproxy: config is invalid:\n%s\n", indentErrors(err))
		return 1
	}
	out, err := cfg.YAML()
	if err != nil {
		fmt.Fprintf(stderr, "sniproxy: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "# sniproxy: config %s is valid; effective config:\n%s", cfg.Source, out)
	return 0
}

// indentErrors puts each line of err (errors.Join puts one error on each)
// on its own indented line.
func indentErrors(err error) string {
	return "  " + strings.ReplaceAll(err.Error(), "\n", "\n  ")
}

// newLogger builds the process logger from the config's log section.
func newLogger(cfg *config.Config, w io.Writer) (*slog.Logger, *slog.LevelVar) {
	lv := new(slog.LevelVar)
	if l, err := logging.ParseLevel(cfg.Log.Level); err == nil {
		lv.Set(l)
	}
	return logging.New(w, cfg.Log.Format, lv), lv
}
