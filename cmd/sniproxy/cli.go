package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/logging"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// configHelp is the part of every command's help that says where the config
// comes from. Long texts are Markdown too (the man pages are made from
// them): names with underscores or angle brackets go in backquotes.
const configHelp = "Without -c the config is `$SNIPROXY_CONFIG`, else `/etc/sniproxy/config.yaml`,\n" +
	"else the embedded default. `SNIPROXY_<KEY>` variables override keys\n" +
	"(`SNIPROXY_MAX_CONNECTIONS=500`, `SNIPROXY_TIMEOUTS_CONNECT=3s`)."

// exitStatus is the error a command returns when it failed and has already
// said why on stderr: run exits with it and prints nothing more. Every
// other error out of the command tree is a usage error (exit 2).
type exitStatus int

func (e exitStatus) Error() string { return "exit status " + strconv.Itoa(int(e)) }

// codeErr turns a command's exit code into its error: nil for 0.
func codeErr(code int) error {
	if code == 0 {
		return nil
	}
	return exitStatus(code)
}

// run executes the command line args and returns the exit status: 0 on
// success, 1 when the command failed, 2 for a usage error (unknown command
// or flag, wrong arguments). sigs are the signals main subscribed to; only
// the proxy itself (sniproxy run) acts on them.
func run(args []string, sigs <-chan os.Signal, stdout, stderr io.Writer) int {
	root := newRootCmd(sigs, stdout, stderr)
	if args == nil {
		args = []string{} // nil would make cobra read os.Args
	}
	root.SetArgs(args)
	cmd, err := root.ExecuteC()
	var es exitStatus
	switch {
	case err == nil:
		return 0
	case errors.As(err, &es):
		return int(es)
	}
	hint := root.CommandPath()
	if cmd != nil && cmd.Name() != "help" {
		hint = cmd.CommandPath()
	}
	fmt.Fprintf(stderr, "sniproxy: %v\nRun '%s --help' for usage.\n", err, hint)
	return 2
}

// newRootCmd builds the command tree. Help and usage go to stdout, errors
// to stderr (run prints usage errors; commands print their own failures).
func newRootCmd(sigs <-chan os.Signal, stdout, stderr io.Writer) *cobra.Command {
	var path string
	var showVersion bool
	root := &cobra.Command{
		Use:   "sniproxy",
		Short: "Route TCP connections by TLS SNI, HTTP Host or h2c :authority",
		Long: `sniproxy routes TCP connections by the name they ask for: the TLS ClientHello
server_name, the HTTP/1.x Host header or the h2c :authority, without
terminating TLS. Without a command it runs the proxy in the foreground, as
` + "`sniproxy run`" + ` does.

` + configHelp + `

Signals to the master: HUP reloads with no downtime (as ` + "`sniproxy reload`" + `
does); TERM, INT or QUIT stops (stop accepting, drain for at most
` + "`shutdown_timeout`" + `, close the rest, exit 0); a second one stops at
once; USR1 reopens ` + "`log.file`" + ` and ` + "`log.access_file`" + ` (logrotate).`,
		SilenceErrors: true,
		SilenceUsage:  true,
		// One completion command of our own (completionCmd): exactly the
		// shells we support, and a usage error for any other.
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
		RunE: func(*cobra.Command, []string) error {
			if showVersion {
				printVersion(stdout)
				return nil
			}
			return codeErr(cmdRun(runFlags{path: path}, sigs, stderr))
		},
	}
	addConfigFlag(root, &path)
	// Our own --version rather than cobra's: cobra's prints "sniproxy
	// version X" and a custom version template would bring text/template,
	// whose reflection keeps every exported method in the binary (+4 MB).
	root.Flags().BoolVarP(&showVersion, "version", "v", false, "print the version, as the version command does")
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetHelpCommand(helpCmd())
	root.AddCommand(runCmd(sigs, stderr), checkCmd(stdout, stderr), reloadCmd(stdout, stderr),
		statusCmd(stdout, stderr), versionCmd(stdout), completionCmd(stdout), manCmd(),
		workerCmd(stderr))
	return root
}

// addConfigFlag gives cmd the -c/--config flag, stored in path.
func addConfigFlag(cmd *cobra.Command, path *string) {
	cmd.Flags().StringVarP(path, "config", "c", "",
		"config `FILE` (default: $SNIPROXY_CONFIG, else /etc/sniproxy/config.yaml, else the embedded one)")
}

// noArgs is cobra.NoArgs with a message that does not call an argument a
// command. (The root has no Args: cobra's own check there reports an
// unknown command and suggests the nearest one.)
func noArgs(_ *cobra.Command, args []string) error {
	if len(args) > 0 {
		return fmt.Errorf("unexpected argument %q", args[0])
	}
	return nil
}

// helpCmd is cobra's help command, except that help for a command that does
// not exist is a usage error instead of the root's help and exit 0.
func helpCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "help [COMMAND]",
		Short: "Help about any command",
		Long:  `Help prints the help of COMMAND (or of sniproxy), as COMMAND --help does.`,
		ValidArgsFunction: func(c *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
			if len(args) > 0 {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			var names []cobra.Completion
			for _, sub := range c.Root().Commands() {
				if sub.IsAvailableCommand() && strings.HasPrefix(sub.Name(), toComplete) {
					names = append(names, cobra.CompletionWithDesc(sub.Name(), sub.Short))
				}
			}
			return names, cobra.ShellCompDirectiveNoFileComp
		},
		RunE: func(c *cobra.Command, args []string) error {
			cmd, rest, err := c.Root().Find(args)
			if err != nil {
				return err
			}
			if len(rest) > 0 {
				return fmt.Errorf("unknown command %q for %q", rest[0], cmd.CommandPath())
			}
			cmd.InitDefaultHelpFlag()
			return cmd.Help()
		},
	}
}

func runCmd(sigs <-chan os.Signal, stderr io.Writer) *cobra.Command {
	var rf runFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the proxy in the foreground (the default command)",
		Long: `Run starts the master, which holds the listening sockets, starts the worker
processes that accept and proxy, and serves /metrics, /healthz and the
control socket. It runs in the foreground until it is stopped; the exit
status is 0 after a stop and 1 when the config is invalid or the master
failed.

With ` + "`--supervise`" + ` (automatic when sniproxy is PID 1, as in a container)
the started process stays for the life of the proxy: it runs the master as
its child, adopts every later generation across reloads and upgrades,
forwards HUP, USR1, TERM, INT and QUIT to the current master, and exits with the
master's exit status once the proxy has stopped.

Run refuses to listen on an address another process already listens on
with ` + "`SO_REUSEPORT`" + ` (another sniproxy instance, say with another metrics
address): the kernel would split the connections between the two. With
` + "`--share-ports`" + ` it joins them anyway.

` + configHelp,
		Args: noArgs,
		RunE: func(*cobra.Command, []string) error {
			return codeErr(cmdRun(rf, sigs, stderr))
		},
	}
	addConfigFlag(cmd, &rf.path)
	cmd.Flags().BoolVar(&rf.keep, "supervise", false,
		"keep this process for the life of the proxy, across reloads (automatic as PID 1)")
	cmd.Flags().BoolVar(&rf.sharePorts, "share-ports", false,
		"listen even where another sniproxy instance listens (the kernel splits the connections)")
	return cmd
}

func checkCmd(stdout, stderr io.Writer) *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Validate the config and print the effective config",
		Long: `Check loads the config as ` + "`sniproxy run`" + ` would, prints the effective config
(defaults and ` + "`SNIPROXY_<KEY>`" + ` overrides applied) and exits 0. When the
config is invalid it prints every problem, each once (key and reason: unknown
keys, values that do not parse, and the checks of what did parse, such as a
metrics address that takes a listener's port), and exits 1. It warns on
stderr, still exiting 0, when the hard fd limit (` + "`ulimit -Hn`" + `) cannot hold
` + "`max_connections`" + ` (about 2 descriptors per connection).

` + configHelp,
		Args: noArgs,
		RunE: func(*cobra.Command, []string) error {
			return codeErr(cmdCheck(path, stdout, stderr))
		},
	}
	addConfigFlag(cmd, &path)
	return cmd
}

func versionCmd(stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print version, commit and Go version",
		Long:  "Version prints the version, the commit and the Go version the binary was built with, as `sniproxy --version` does.",
		Args:  noArgs,
		RunE: func(*cobra.Command, []string) error {
			printVersion(stdout)
			return nil
		},
	}
}

// printVersion prints the version line of version and --version.
func printVersion(w io.Writer) {
	fmt.Fprintf(w, "sniproxy %s (commit %s, %s)\n", version, commit(), runtime.Version())
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

// loadConfig resolves and loads the config for a subcommand.
func loadConfig(path string) (*config.Config, error) {
	return config.Load(config.Resolve(path, nil, nil), nil)
}

func cmdCheck(path string, stdout, stderr io.Writer) int {
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
	warnFDLimit(cfg, stderr)
	return 0
}

// warnFDLimit warns on stderr when the hard RLIMIT_NOFILE (run raises the
// soft limit to it) cannot hold max_connections.
func warnFDLimit(cfg *config.Config, stderr io.Writer) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	if need := fdsNeeded(cfg.MaxConnections); lim.Max < need {
		fmt.Fprintf(stderr, "sniproxy: warning: max_connections %d needs about %d file descriptors, "+
			"but the hard limit (RLIMIT_NOFILE, ulimit -Hn) is %d: raise it (LimitNOFILE= under systemd) or lower max_connections\n",
			cfg.MaxConnections, need, lim.Max)
	}
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
