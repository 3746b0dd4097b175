// Command sniproxy routes TCP connections by the name they ask for: the TLS
// ClientHello server_name, the HTTP/1.x Host header or the h2c :authority,
// without terminating TLS. See README.md for usage.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// Signals first: Go's default for SIGHUP and SIGUSR1 is to exit, and a
	// reload or a log reopen must never kill the proxy. run takes over
	// from here.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT)
	os.Exit(run(os.Args[1:], sigs, os.Stdout, os.Stderr))
}
