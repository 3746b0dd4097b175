package master

import (
	"fmt"
	"net"
	"os"
	"strings"
)

// sdNotify sends state to systemd's notify socket ($NOTIFY_SOCKET), if
// there is one; it does nothing otherwise. With Type=notify and
// NotifyAccess=all, a successor master sends "MAINPID=<pid>\nREADY=1" so
// systemd follows it before its predecessor exits.
func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:] // abstract namespace
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("master: sd_notify: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("master: sd_notify: %w", err)
	}
	return nil
}
