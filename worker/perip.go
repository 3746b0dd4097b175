package worker

import (
	"errors"
	"net/netip"

	"github.com/sniproxy/sniproxy/internal/stats"
)

// PerIPLimiter admits new connections per client for the per-client limits
// (limits.per_ip_*, global across workers): package perip's Client. Key
// maps a client address to its key (IPv6 grouped by limits.ipv6_prefix);
// every Acquire that reports true is followed by one Release of the same
// key when the connection ends. Adopt counts the client permit a moved
// connection came with (granted by the master with it); when it reports
// true, one Release follows too.
type PerIPLimiter interface {
	Key(netip.Addr) netip.Addr
	Acquire(key netip.Addr) bool
	Adopt(key netip.Addr) bool
	Release(key netip.Addr)
}

// errPerIP is the access log's "err" of a connection refused per client.
var errPerIP = errors.New("worker: per-client limit reached (limits.per_ip_connections or per_ip_rate)")

// admitPerIP admits the connection under its client's limits, once its
// client is known: in the admit phase, or after the PROXY header on a
// listener that expects one (the client is the one the header names).
// Refused, it is closed at once, counted per_ip_limit.
func (p *path) admitPerIP() result {
	c := p.c
	lim := c.srv.PerIP
	if lim == nil {
		return result{}
	}
	key := lim.Key(c.peer.Addr())
	if !lim.Acquire(key) {
		return rejected(stats.PerIPLimit, errPerIP)
	}
	c.perIPKey = key
	return result{}
}

// releasePerIP gives back the client's client permit, once (conn.finish),
// unless the connection moves with it.
func (c *conn) releasePerIP() {
	if c.perIPKey.IsValid() && !c.perIPMoved {
		c.srv.PerIP.Release(c.perIPKey)
		c.perIPKey = netip.Addr{}
	}
}

// movedKey returns the key a moved connection goes with (ipc.Connection's
// Key): the client key whose client permit it held here, or, with none,
// the client's address (the next generation may limit per client where
// this one does not).
func (c *conn) movedKey() netip.Addr {
	if c.perIPMoved && c.perIPKey.IsValid() {
		return c.perIPKey
	}
	return c.peer.Addr().Unmap().WithZone("")
}

// releaseMovedPerIP gives back the client permit of a connection moved
// away, once it is sent (Server.sendMoved).
func (c *conn) releaseMovedPerIP() {
	if c.perIPMoved && c.perIPKey.IsValid() {
		c.srv.PerIP.Release(c.perIPKey)
		c.perIPKey = netip.Addr{}
	}
}
