package main

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/sniproxy/sniproxy/internal/status"
)

// printBackends prints the pool backends of a status: route, backend,
// state and since when, open and total connections, last check error.
func printBackends(w io.Writer, bs []status.Backend) {
	if len(bs) == 0 {
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ROUTE\tBACKEND\tSTATE\tSINCE\tACTIVE\tCONNECTIONS\tLAST ERROR")
	for _, b := range bs {
		addr := b.Address
		if b.Backup {
			addr += " (backup)"
		}
		state := "up"
		if !b.Up {
			state = "down"
		}
		since := "-"
		if !b.Since.IsZero() {
			since = b.Since.Local().Format(time.DateTime) + " (" + time.Since(b.Since).Round(time.Second).String() + " ago)"
		}
		last := b.LastError
		if last == "" {
			last = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%s\n", b.Route, addr, state, since, b.Active, b.Connections, last)
	}
	tw.Flush()
}
