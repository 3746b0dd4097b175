package route

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// dnsServer is a name server on loopback (UDP and TCP) for the resolver's
// tests: no test ever queries a name server off this host.
type dnsServer struct {
	udp net.PacketConn
	tcp net.Listener
	// handle returns the replies to one query: over UDP each is sent as
	// its own datagram, over TCP only the last.
	handle func(id uint16, q dnsmessage.Question, tcp bool) []dnsmessage.Message

	mu      sync.Mutex
	queries []string // "udp A name." in arrival order
	got     chan struct{}
	wg      sync.WaitGroup
}

// startDNS runs a name server answering with handle until the test ends.
func startDNS(t *testing.T, handle func(id uint16, q dnsmessage.Question, tcp bool) []dnsmessage.Message) *dnsServer {
	t.Helper()
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		udp.Close()
		t.Fatal(err)
	}
	s := &dnsServer{udp: udp, tcp: tcp, handle: handle, got: make(chan struct{}, 1000)}
	s.wg.Add(2)
	go s.serveUDP(t)
	go s.serveTCP(t)
	t.Cleanup(func() {
		udp.Close()
		tcp.Close()
		s.wg.Wait()
	})
	return s
}

// zoneServer runs a name server answering from z.
func zoneServer(t *testing.T, z zone) *dnsServer {
	return startDNS(t, func(id uint16, q dnsmessage.Question, _ bool) []dnsmessage.Message {
		return []dnsmessage.Message{z.answer(id, q)}
	})
}

func (s *dnsServer) serveUDP(t *testing.T) {
	defer s.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, from, err := s.udp.ReadFrom(buf)
		if err != nil {
			return
		}
		id, q, ok := s.query(t, "udp", buf[:n])
		if !ok {
			continue
		}
		s.wg.Add(1)
		go func() { // a handler may hold its reply back
			defer s.wg.Done()
			for _, m := range s.handle(id, q, false) {
				b, err := m.Pack()
				if err != nil {
					t.Errorf("dns server: pack: %v", err)
					return
				}
				s.udp.WriteTo(b, from)
			}
		}()
	}
}

func (s *dnsServer) serveTCP(t *testing.T) {
	defer s.wg.Done()
	for {
		c, err := s.tcp.Accept()
		if err != nil {
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			var l [2]byte
			if _, err := io.ReadFull(c, l[:]); err != nil {
				return
			}
			msg := make([]byte, binary.BigEndian.Uint16(l[:]))
			if _, err := io.ReadFull(c, msg); err != nil {
				return
			}
			id, q, ok := s.query(t, "tcp", msg)
			if !ok {
				return
			}
			replies := s.handle(id, q, true)
			if len(replies) == 0 {
				return
			}
			b, err := replies[len(replies)-1].Pack()
			if err != nil {
				t.Errorf("dns server: pack: %v", err)
				return
			}
			c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...))
		}()
	}
}

// query parses and records one query, checking it is what the resolver
// should send: one question, recursion desired, an EDNS(0) record.
func (s *dnsServer) query(t *testing.T, network string, b []byte) (uint16, dnsmessage.Question, bool) {
	var m dnsmessage.Message
	if err := m.Unpack(b); err != nil || len(m.Questions) != 1 {
		t.Errorf("dns server: bad query (%v): %x", err, b)
		return 0, dnsmessage.Question{}, false
	}
	if !m.RecursionDesired || len(m.Additionals) != 1 || m.Additionals[0].Header.Type != dnsmessage.TypeOPT {
		t.Errorf("dns server: query %+v: want recursion desired and one OPT record", m)
	}
	q := m.Questions[0]
	s.mu.Lock()
	s.queries = append(s.queries, network+" "+strings.TrimPrefix(q.Type.String(), "Type")+" "+q.Name.String())
	s.mu.Unlock()
	s.got <- struct{}{}
	return m.ID, q, true
}

// asked returns the queries received so far.
func (s *dnsServer) asked() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.queries...)
}

// resolver returns a DNSResolver reading a resolv.conf with the given
// content, whose every name server is this server.
func (s *dnsServer) resolver(t *testing.T, resolvConf string) *DNSResolver {
	return &DNSResolver{ResolvConf: writeResolvConf(t, resolvConf), DialContext: s.dial}
}

func (s *dnsServer) dial(ctx context.Context, network, _ string) (net.Conn, error) {
	var d net.Dialer
	if network == "tcp" {
		return d.DialContext(ctx, "tcp", s.tcp.Addr().String())
	}
	return d.DialContext(ctx, "udp", s.udp.LocalAddr().String())
}

func writeResolvConf(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// zone maps absolute lower-case names to their records (A, AAAA, CNAME).
// Every name is under one zone whose SOA has negative TTL soaMin.
type zone map[string][]dnsmessage.Resource

const soaMin = 20

// answer answers q the way a recursive server does: the CNAME chain, then
// the records of q's type; NXDOMAIN or NODATA with the SOA otherwise.
func (z zone) answer(id uint16, q dnsmessage.Question) dnsmessage.Message {
	m := reply(id, q)
	name := strings.ToLower(q.Name.String())
	if _, ok := z[name]; !ok {
		m.RCode = dnsmessage.RCodeNameError
		m.Authorities = []dnsmessage.Resource{rrSOA(3600, soaMin)}
		return m
	}
	for range 10 {
		next := ""
		for _, r := range z[name] {
			switch r.Header.Type {
			case q.Type:
				m.Answers = append(m.Answers, r)
			case dnsmessage.TypeCNAME:
				m.Answers = append(m.Answers, r)
				next = r.Body.(*dnsmessage.CNAMEResource).CNAME.String()
			}
		}
		if next == "" {
			break
		}
		name = next
	}
	if len(m.Answers) == 0 || m.Answers[len(m.Answers)-1].Header.Type == dnsmessage.TypeCNAME {
		m.Authorities = []dnsmessage.Resource{rrSOA(3600, soaMin)}
	}
	return m
}

// reply starts the reply to query id for q.
func reply(id uint16, q dnsmessage.Question) dnsmessage.Message {
	return dnsmessage.Message{
		Header:    dnsmessage.Header{ID: id, Response: true, RecursionDesired: true, RecursionAvailable: true},
		Questions: []dnsmessage.Question{q},
	}
}

// rrAddr is an A or AAAA record, after ip's family.
func rrAddr(name string, ttl uint32, ip string) dnsmessage.Resource {
	a := netip.MustParseAddr(ip)
	h := dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(name), Class: dnsmessage.ClassINET, TTL: ttl}
	if a.Is4() {
		h.Type = dnsmessage.TypeA
		return dnsmessage.Resource{Header: h, Body: &dnsmessage.AResource{A: a.As4()}}
	}
	h.Type = dnsmessage.TypeAAAA
	return dnsmessage.Resource{Header: h, Body: &dnsmessage.AAAAResource{AAAA: a.As16()}}
}

func rrCNAME(name string, ttl uint32, target string) dnsmessage.Resource {
	return dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeCNAME, Class: dnsmessage.ClassINET, TTL: ttl},
		Body:   &dnsmessage.CNAMEResource{CNAME: dnsmessage.MustNewName(target)},
	}
}

func rrSOA(ttl, minTTL uint32) dnsmessage.Resource {
	return dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("test."), Type: dnsmessage.TypeSOA, Class: dnsmessage.ClassINET, TTL: ttl},
		Body: &dnsmessage.SOAResource{
			NS: dnsmessage.MustNewName("ns.test."), MBox: dnsmessage.MustNewName("hostmaster.test."),
			Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400, MinTTL: minTTL,
		},
	}
}
