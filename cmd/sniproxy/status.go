package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sniproxy/sniproxy/config"
	"github.com/sniproxy/sniproxy/internal/peercred"
	"github.com/sniproxy/sniproxy/internal/status"
	"github.com/sniproxy/sniproxy/master"
)

func statusCmd(stdout, stderr io.Writer) *cobra.Command {
	var path string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the running master's generation, workers and totals",
		Long: `Status asks the running master, over its control socket, for its version,
pid, generation, uptime and config, each worker (slot, pid, ready, active
connections, restarts, uptime) and the totals (connections, bytes,
rejections). It exits 1 when no master answers.

The control socket is the one the config names (` + "`control_socket`" + `), else
` + "`$RUNTIME_DIRECTORY/sniproxy.sock`" + `, else ` + "`/run/sniproxy/sniproxy.sock`" + ` when
that directory exists and is writable, or holds a socket and you have no
master of your own (a root master's, which serves the members of its
` + "`group`" + `), else ` + "`sniproxy.sock`" + ` in the temp dir. A config that no longer
validates is reported, and the status shown all the same: only its
` + "`control_socket`" + ` is needed.

` + configHelp,
		Args: noArgs,
		RunE: func(*cobra.Command, []string) error {
			return codeErr(cmdStatus(path, asJSON, stdout, stderr))
		},
	}
	addConfigFlag(cmd, &path)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the master's answer as JSON")
	return cmd
}

// cmdStatus prints the status of the master found through the config at
// path.
func cmdStatus(path string, asJSON bool, stdout, stderr io.Writer) int {
	sock, _ := findMaster(path, stderr)
	st, raw, err := fetchStatus(sock)
	if err != nil {
		fmt.Fprintf(stderr, "sniproxy: status: %v\n", err)
		return 1
	}
	if asJSON {
		stdout.Write(raw)
		return 0
	}
	printStatus(stdout, st)
	return 0
}

// findMaster returns the control socket and PID file of the master the
// config at path (resolved as run resolves it) runs. A config that does
// not validate is reported on stderr, and the two keys read from it
// leniently (config.Peek). One this user may not read (a member of a root
// master's group, say) is reported as such: its keys come from the
// environment, or are the defaults.
func findMaster(path string, stderr io.Writer) (sock, pidFile string) {
	cfg, err := loadConfig(path)
	if err == nil {
		return master.FindControlSocket(cfg), cfg.PIDFile
	}
	if errors.Is(err, fs.ErrPermission) {
		fmt.Fprintf(stderr, "sniproxy: warning: %v; looking for the master without it\n", err)
	} else {
		fmt.Fprintf(stderr, "sniproxy: warning: the config on disk is invalid (the master runs the one it loaded; a reload would fail):\n%s\n",
			indentErrors(err))
	}
	ctl, pidFile := config.Peek(config.Resolve(path, nil, nil), nil)
	cfg = &config.Config{ControlSocket: ctl}
	return master.FindControlSocket(cfg), pidFile
}

// fetchStatus asks the master at the control socket for its Status.
func fetchStatus(sock string) (status.Status, []byte, error) {
	var st status.Status
	d := net.Dialer{Timeout: 5 * time.Second}
	c := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialControl(ctx, &d, sock)
		}},
	}
	resp, err := c.Get("http://sniproxy/status")
	if err != nil {
		return st, nil, fmt.Errorf("no master answers on %s: %w", sock, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return st, nil, fmt.Errorf("reading %s: %w", sock, err)
	}
	if resp.StatusCode != http.StatusOK {
		msg := strings.TrimSpace(string(raw))
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(raw, &e) == nil && e.Error != "" {
			msg = e.Error // a refusal (403) says why
		}
		return st, nil, fmt.Errorf("%s: %s: %s", sock, resp.Status, msg)
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return st, nil, fmt.Errorf("%s: bad answer: %w", sock, err)
	}
	return st, raw, nil
}

func printStatus(w io.Writer, st status.Status) {
	fmt.Fprintf(w, "sniproxy %s, master pid %d, generation %d, up %s\nconfig %s\n\n",
		st.Version, st.PID, st.Generation, time.Duration(st.UptimeSeconds*float64(time.Second)).Round(time.Second), st.Config)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SLOT\tPID\tREADY\tACTIVE\tRESTARTS\tUP")
	for _, wk := range st.Workers {
		up := "-"
		if !wk.Started.IsZero() {
			up = time.Since(wk.Started).Round(time.Second).String()
		}
		fmt.Fprintf(tw, "%d\t%d\t%v\t%d\t%d\t%s\n", wk.Slot, wk.PID, wk.Ready, wk.Active, wk.Restarts, up)
	}
	tw.Flush()
	t := st.Totals
	fmt.Fprintf(w, "\nactive %d, connections %d, bytes in %d, out %d, worker restarts %d\n", t.Active, t.Connections, t.BytesIn, t.BytesOut, st.Restarts)
	var rej []string
	for _, r := range []string{"limit", "per_ip_limit", "proxy_header", "denied", "no_route", "sniff_timeout", "sniff_error", "dial_error"} {
		rej = append(rej, fmt.Sprintf("%s %d", r, t.Rejected[r]))
	}
	fmt.Fprintf(w, "rejected: %s\n", strings.Join(rej, ", "))
	var protos []string
	for _, p := range []string{"tls", "http", "h2c", "unknown"} {
		protos = append(protos, fmt.Sprintf("%s %d", p, t.Protocols[p]))
	}
	fmt.Fprintf(w, "protocols: %s\n", strings.Join(protos, ", "))
	printBackends(w, st.Backends)
	if len(st.Reloads) > 0 {
		r := st.Reloads[0]
		fmt.Fprintf(w, "last reload: %s, %s, took %s", r.Time.Local().Format(time.DateTime), r.Result,
			time.Duration(r.DurationSeconds*float64(time.Second)).Round(time.Millisecond))
		if r.Error != "" {
			fmt.Fprintf(w, ": %s", r.Error)
		}
		fmt.Fprintln(w)
	}
}

// dialControl connects to the control socket at sock and makes sure the
// process that answers is root's or this user's (SO_PEERCRED): a socket
// another user squatted at the path could otherwise forge the master's
// answers. A refusal is a dial error: nothing was asked.
func dialControl(ctx context.Context, d *net.Dialer, sock string) (net.Conn, error) {
	c, err := d.DialContext(ctx, "unix", sock)
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, &net.OpError{Op: "dial", Net: "unix", Err: fmt.Errorf("not a Unix socket: %T", c)}
	}
	if cr, err := peercred.Check(uc); err != nil {
		c.Close()
		return nil, &net.OpError{Op: "dial", Net: "unix", Err: fmt.Errorf("%s is served by pid %d of uid %d, neither root nor you: not trusting it: %w", sock, cr.PID, cr.UID, err)}
	}
	return c, nil
}
