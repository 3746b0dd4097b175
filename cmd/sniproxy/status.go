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

	"github.com/sniproxy/sniproxy/master"
)

func cmdStatus(args []string, stdout, stderr io.Writer) int {
	fs, path := configFlagSet("status", "(to find the control socket)", stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg, err := loadConfig(*path)
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
	if *asJSON {
		stdout.Write(raw)
		return 0
	}
	printStatus(stdout, st)
	return 0
}

// fetchStatus asks the master at the control socket for its Status.
func fetchStatus(sock string) (master.Status, []byte, error) {
	var st master.Status
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

func printStatus(w io.Writer, st master.Status) {
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
	for _, r := range []string{"limit", "denied", "no_route", "sniff_timeout", "sniff_error", "dial_error"} {
		rej = append(rej, fmt.Sprintf("%s %d", r, t.Rejected[r]))
	}
	fmt.Fprintf(w, "rejected: %s\n", strings.Join(rej, ", "))
}
