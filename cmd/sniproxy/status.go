package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

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

The control socket is the one the config names.

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
	cfg, err := loadConfig(path)
	if err != nil {
		fmt.Fprintf(stderr, "sniproxy: config is invalid:\n%s\n", indentErrors(err))
		return 1
	}
	sock := master.ControlSocketPath(cfg)
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

// fetchStatus asks the master at the control socket for its Status.
func fetchStatus(sock string) (status.Status, []byte, error) {
	var st status.Status
	d := net.Dialer{Timeout: 5 * time.Second}
	c := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", sock)
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
		return st, nil, fmt.Errorf("%s: %s: %s", sock, resp.Status, strings.TrimSpace(string(raw)))
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
