package worker

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/sniproxy/sniproxy/internal/stats"
)

var (
	proxyV1Prefix = []byte("PROXY ")
	proxyV2Sig    = []byte{0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a}
)

const (
	proxyV1Max = 107 // the longest v1 line, CRLF included
	proxyV2Max = 16 + 1024
)

// proxyHeaderTimeout bounds the wait for the PROXY header on a listener
// with accept_proxy_protocol (or timeouts.client_hello, if shorter). A
// balancer writes the header as soon as it has connected, before any byte
// of the client's, so a header that is late is not coming: this frees the
// sniff slot sooner than the whole sniff phase would.
const proxyHeaderTimeout = 3 * time.Second

// errProxyHeader marks a missing or malformed PROXY protocol header.
var errProxyHeader = errors.New("worker: bad PROXY protocol header")

// proxyHeaderLen returns the length of the PROXY header at the start of b,
// 0 if more bytes are needed, or an error if b does not start with one.
func proxyHeaderLen(b []byte) (int, error) {
	switch {
	case len(b) >= len(proxyV2Sig) && bytes.Equal(b[:len(proxyV2Sig)], proxyV2Sig):
		if len(b) < 16 {
			return 0, nil
		}
		n := 16 + int(binary.BigEndian.Uint16(b[14:16]))
		if n > proxyV2Max {
			return 0, fmt.Errorf("%w: v2 header of %d bytes", errProxyHeader, n)
		}
		if len(b) < n {
			return 0, nil
		}
		return n, nil
	case bytes.HasPrefix(b, proxyV1Prefix):
		if i := bytes.Index(b[:min(len(b), proxyV1Max)], []byte("\r\n")); i >= 0 {
			return i + 2, nil
		}
		if len(b) >= proxyV1Max {
			return 0, fmt.Errorf("%w: v1 line longer than %d bytes", errProxyHeader, proxyV1Max)
		}
		return 0, nil
	case bytes.HasPrefix(proxyV1Prefix, b) || bytes.HasPrefix(proxyV2Sig, b):
		return 0, nil
	}
	return 0, fmt.Errorf("%w: missing", errProxyHeader)
}

// readProxyHeader reads a PROXY v1 or v2 header from conn before deadline.
// It returns the header and the bytes read after it, which belong to the
// client's stream.
func readProxyHeader(conn net.Conn, deadline time.Time) (*proxyproto.Header, []byte, error) {
	if err := conn.SetReadDeadline(deadline); err != nil {
		return nil, nil, fmt.Errorf("worker: set deadline: %w", err)
	}
	defer conn.SetReadDeadline(time.Time{})
	buf := make([]byte, 0, 256)
	for {
		h, n, err := parseProxyHeader(buf)
		if err != nil {
			return nil, nil, err
		}
		if n > 0 {
			return h, buf[n:], nil
		}
		if len(buf) == cap(buf) {
			buf = append(buf, make([]byte, cap(buf))...)[:len(buf)]
		}
		m, err := conn.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+m]
		if err != nil && m == 0 {
			return nil, nil, proxyReadError(err, len(buf))
		}
	}
}

// parseProxyHeader parses the PROXY header at the start of b: n is its
// length, 0 while more bytes are needed; err for a bad or missing one.
func parseProxyHeader(b []byte) (h *proxyproto.Header, n int, err error) {
	n, err = proxyHeaderLen(b)
	if err != nil || n == 0 {
		return nil, 0, err
	}
	h, err = proxyproto.Read(bufio.NewReaderSize(bytes.NewReader(b[:n]), n))
	if err != nil {
		return nil, 0, fmt.Errorf("%w: %w", errProxyHeader, err)
	}
	return h, n, nil
}

// proxyReadError is the error of a read that failed with err, n bytes
// into a PROXY header.
func proxyReadError(err error, n int) error {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("worker: no complete PROXY header in time (%d bytes read): %w", n, err)
	case errors.Is(err, io.EOF):
		return fmt.Errorf("%w: connection closed", errProxyHeader)
	}
	return fmt.Errorf("worker: read PROXY header: %w", err)
}

// readProxy runs the PROXY protocol part of the sniff phase on a listener
// with accept_proxy_protocol. A client outside the listener's
// trusted_proxies is refused before anything is read; a header that is
// missing, malformed or not complete within proxyHeaderTimeout is refused
// too, both counted proxy_header. A header naming a TCP client makes that
// client the connection's (path.setAddrs); LOCAL (a balancer's health
// check), v1 UNKNOWN and a Unix-socket client leave the socket's own peer.
// It returns the bytes read after the header, the start of the client's
// stream.
func (p *path) readProxy() ([]byte, result) {
	c := p.c
	refuse := func(err error) ([]byte, result) {
		p.countProtocol()
		return nil, rejected(stats.ProxyHeader, err)
	}
	deadline := c.start.Add(min(c.srv.cfg.Timeouts.ClientHello, proxyHeaderTimeout))
	h, rest, err := readProxyHeader(c.client, deadline)
	if err != nil && c.wasClosed() {
		return nil, closedSniffing(err)
	}
	if err != nil {
		return refuse(err)
	}
	if r := p.useProxyHeader(h); r.end != endNext {
		return nil, r
	}
	return rest, result{}
}

// useProxyHeader makes the client h names the connection's (see
// headerAddrs); a header naming none that way is refused, counted
// proxy_header.
func (p *path) useProxyHeader(h *proxyproto.Header) result {
	src, dst, ok, err := headerAddrs(h)
	if err != nil {
		p.countProtocol()
		return rejected(stats.ProxyHeader, err)
	}
	if ok {
		p.setAddrs(src, dst)
	}
	return result{}
}

// headerAddrs returns the client and the address it connected to that h
// names, unmapped (an IPv4-mapped IPv6 address as IPv4); ok is false when
// h names none, so the socket's own addresses stand: LOCAL (a balancer's
// own connection, e.g. HAProxy's health checks), v1 UNKNOWN, and a client
// on a Unix socket. A UDP client on a TCP connection is an error.
func headerAddrs(h *proxyproto.Header) (src, dst netip.AddrPort, ok bool, err error) {
	if h.Command.IsLocal() {
		return src, dst, false, nil
	}
	switch h.TransportProtocol {
	case proxyproto.TCPv4, proxyproto.TCPv6:
		s, sok := h.SourceAddr.(*net.TCPAddr)
		d, dok := h.DestinationAddr.(*net.TCPAddr)
		if !sok || !dok {
			return src, dst, false, fmt.Errorf("%w: no TCP addresses", errProxyHeader)
		}
		src, dst = unmapAddrPort(s.AddrPort()), unmapAddrPort(d.AddrPort())
		if !src.Addr().IsValid() || !dst.Addr().IsValid() {
			return src, dst, false, fmt.Errorf("%w: no TCP addresses", errProxyHeader)
		}
		return src, dst, true, nil
	case proxyproto.UnixStream:
		return src, dst, false, nil
	}
	return src, dst, false, fmt.Errorf("%w: family 0x%02x, not TCP, on a TCP connection", errProxyHeader, byte(h.TransportProtocol))
}

// unmapAddrPort returns a with an IPv4-mapped IPv6 address as IPv4: the
// same client, as a dual-stack listener or a TCP6 header may show it.
func unmapAddrPort(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// addrPortOf returns the address of a TCP socket's end, unmapped; the
// zero AddrPort if a is not a TCP address.
func addrPortOf(a net.Addr) netip.AddrPort {
	if t, ok := a.(*net.TCPAddr); ok {
		return unmapAddrPort(t.AddrPort())
	}
	return netip.AddrPort{}
}

// formatProxyHeader returns the PROXY header (version "v1" or "v2") that
// tells a backend the client src connected to dst and asked for name.
// Both addresses IPv4 (IPv4-mapped ones count as IPv4) give TCP4 / AF_INET;
// otherwise TCP6 / AF_INET6, an IPv4 end written IPv4-mapped (as HAProxy
// does for mixed families). Without both addresses: v1 UNKNOWN, v2 LOCAL.
// v2 carries name, if any, as the PP2_TYPE_AUTHORITY TLV.
func formatProxyHeader(version string, src, dst netip.AddrPort, name string) ([]byte, error) {
	v := byte(1)
	if version == "v2" {
		v = 2
	}
	h := &proxyproto.Header{Version: v, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	if s.IsValid() && d.IsValid() {
		h.Command = proxyproto.PROXY
		if s.Is4() && d.Is4() {
			h.TransportProtocol = proxyproto.TCPv4
		} else {
			h.TransportProtocol = proxyproto.TCPv6
			s, d = netip.AddrFrom16(s.As16()), netip.AddrFrom16(d.As16())
		}
		h.SourceAddr = &net.TCPAddr{IP: s.AsSlice(), Port: int(src.Port())}
		h.DestinationAddr = &net.TCPAddr{IP: d.AsSlice(), Port: int(dst.Port())}
	}
	if v == 2 && name != "" {
		if err := h.SetTLVs([]proxyproto.TLV{{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte(name)}}); err != nil {
			return nil, fmt.Errorf("worker: PROXY header authority %q: %w", name, err)
		}
	}
	b, err := h.Format()
	if err != nil {
		return nil, fmt.Errorf("worker: PROXY header from %v to %v: %w", src, dst, err)
	}
	return b, nil
}
