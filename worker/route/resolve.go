package route

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Defaults of DNSResolver's fields.
const (
	defaultResolvConf     = "/etc/resolv.conf"
	defaultMinTTL         = time.Second
	defaultMaxTTL         = 5 * time.Minute
	defaultMaxNegativeTTL = 30 * time.Second
	defaultCacheSize      = 10000
)

const (
	// resolvConfCheck is how often the resolver configuration file is
	// looked at for changes.
	resolvConfCheck = 5 * time.Second
	// ednsSize is the UDP payload size announced in queries (EDNS(0)): the
	// DNS flag day 2020 value, which fits any path MTU without
	// fragmentation. Larger answers come truncated and are asked for again
	// over TCP.
	ednsSize = 1232
	// maxCNAMEs bounds the CNAME chain followed within one answer.
	maxCNAMEs = 8
	// maxAnswerAddrs bounds the addresses kept of one answer (the dialler
	// tries at most 16 of them anyway): a name's owner controls its
	// answer, and a 64 KiB one would otherwise hold 4000 addresses in the
	// cache and be copied at every hit.
	maxAnswerAddrs = 64
)

// DNSResolver looks up the addresses of DNS-routed names: names a client
// asked for, which are not configuration the operator wrote. It asks the
// name servers of a resolv.conf file directly (A and AAAA, over UDP, again
// over TCP when an answer is truncated) and caches their answers.
//
// Every name is absolute: "secret" means the top-level name "secret.", never
// "secret.corp.example" by way of the search list, whatever the file's
// search, domain and ndots say. /etc/hosts is not read, as in nginx's
// resolver: a client's name is a DNS name, and a hosts file tends to hold
// names of this host and its private network. The only names answered
// without a query are "localhost" and the names under it (RFC 6761 section
// 6.3): ::1 and 127.0.0.1, which the address policy then refuses unless
// backend.allow_private is set.
//
// Answers are cached for their TTL (the least TTL of the records used,
// CNAMEs included), kept within MinTTL and MaxTTL; NXDOMAIN and answers
// with no address of the type asked for are cached for the SOA record's
// negative TTL (RFC 2308: the lesser of its TTL and its minimum field), at
// most MaxNegativeTTL, and not at all when the server sent no SOA. Errors
// (timeouts, SERVFAIL, REFUSED, malformed answers) are not cached.
// Concurrent look-ups of one name share one query, which runs until it is
// answered or every caller waiting for it has given up.
//
// Set the fields before the first look-up and do not change them
// afterwards; LookupNetIP is then safe for concurrent use. A DNSResolver
// must not be copied after first use.
type DNSResolver struct {
	// ResolvConf is the file whose nameserver lines (at most 3) and
	// timeout:N and attempts:N options are used; "" means
	// /etc/resolv.conf. Its search, domain and other options are ignored.
	// Without the file, or without a nameserver line, 127.0.0.1 and ::1
	// are asked, as the C library does. The file is read again when its
	// modification time or size has changed, looked at every 5s at most.
	ResolvConf string

	// DialContext connects to a name server: network is "udp" or "tcp",
	// address "ip:53" from ResolvConf. nil means a net.Dialer's. A seam for
	// tests, which point it at a name server of their own.
	DialContext func(ctx context.Context, network, address string) (net.Conn, error)

	// MinTTL and MaxTTL bound how long an answer with addresses is cached;
	// zero means 1s and 5m.
	MinTTL, MaxTTL time.Duration

	// MaxNegativeTTL bounds how long a negative answer is cached; zero
	// means 30s.
	MaxNegativeTTL time.Duration

	// CacheSize bounds the number of cached answers, one per name and
	// record type; the least recently used is evicted first. Zero means
	// 10,000; negative means no cache (concurrent look-ups are still
	// shared).
	CacheSize int

	// Now is the cache's clock; nil means time.Now. A seam for tests.
	Now func() time.Time

	once  sync.Once
	cache *dnsCache
	conf  confFile
}

// LookupNetIP returns the addresses of host, taken as an absolute name
// (with or without its trailing dot). network "ip" asks for AAAA and A
// records and returns the IPv6 addresses first; "ip4" asks only for A,
// "ip6" only for AAAA. The error is a *net.DNSError: IsNotFound when the
// name does not exist or has no address of the family asked for,
// IsTimeout when ctx ended or no server answered in time.
func (r *DNSResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	r.once.Do(r.init)
	name := strings.ToLower(strings.TrimSuffix(host, ".")) + "."
	var types []dnsmessage.Type
	switch network {
	case "ip":
		types = []dnsmessage.Type{dnsmessage.TypeAAAA, dnsmessage.TypeA}
	case "ip6":
		types = []dnsmessage.Type{dnsmessage.TypeAAAA}
	case "ip4":
		types = []dnsmessage.Type{dnsmessage.TypeA}
	default:
		return nil, &net.DNSError{Err: "unknown network " + strconv.Quote(network), Name: host}
	}
	if name == "." {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	if name == "localhost." || strings.HasSuffix(name, ".localhost.") {
		var addrs []netip.Addr
		for _, t := range types {
			if t == dnsmessage.TypeAAAA {
				addrs = append(addrs, netip.IPv6Loopback())
			} else {
				addrs = append(addrs, netip.AddrFrom4([4]byte{127, 0, 0, 1}))
			}
		}
		return addrs, nil
	}
	qname, err := dnsmessage.NewName(name)
	if err != nil {
		return nil, &net.DNSError{Err: "invalid name: " + err.Error(), Name: host, IsNotFound: true}
	}

	results := make([]struct {
		addrs []netip.Addr
		err   error
	}, len(types))
	if len(types) == 1 {
		results[0].addrs, results[0].err = r.lookupType(ctx, qname, types[0])
	} else {
		var wg sync.WaitGroup
		for i, t := range types {
			wg.Go(func() { results[i].addrs, results[i].err = r.lookupType(ctx, qname, t) })
		}
		wg.Wait()
	}
	var addrs []netip.Addr
	var firstErr error
	for _, res := range results {
		addrs = append(addrs, res.addrs...)
		var de *net.DNSError
		if res.err != nil && (firstErr == nil || errors.As(firstErr, &de) && de.IsNotFound) {
			// A failure says more than "no such host" from the other type.
			firstErr = res.err
		}
	}
	if len(addrs) > 0 {
		return addrs, nil
	}
	return nil, firstErr
}

func (r *DNSResolver) init() {
	size := r.CacheSize
	if size == 0 {
		size = defaultCacheSize
	}
	r.cache = newDNSCache(size)
	r.conf.path = r.ResolvConf
	if r.conf.path == "" {
		r.conf.path = defaultResolvConf
	}
}

func (r *DNSResolver) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// lookupType returns the addresses of one type for qname, from the cache or
// from the flight that asks the name servers. A nil error with no address
// cannot happen: a negative answer is a not-found *net.DNSError.
func (r *DNSResolver) lookupType(ctx context.Context, qname dnsmessage.Name, qtype dnsmessage.Type) ([]netip.Addr, error) {
	k := cacheKey{name: qname.String(), qtype: qtype}
	c := r.cache
	c.mu.Lock()
	if addrs, ok := c.getLocked(k, r.now()); ok {
		c.mu.Unlock()
		if len(addrs) == 0 {
			return nil, notFound(k.name)
		}
		return addrs, nil
	}
	f, ok := c.flights[k]
	if ok {
		f.waiters++
		f.refs++
	} else {
		// The query runs on its own, so that a caller that gives up does
		// not cancel it for the others waiting; the last one to give up
		// does, so that clients asking for names whose servers never
		// answer cannot pile up queries beyond their own patience.
		fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &flight{done: make(chan struct{}), refs: 1, cancel: cancel}
		c.flights[k] = f
		go r.fly(fctx, k, qname, f)
	}
	c.mu.Unlock()
	select {
	case <-f.done:
		return f.addrs, f.err
	case <-ctx.Done():
		c.mu.Lock()
		f.refs--
		if f.refs == 0 {
			f.cancel()
			if c.flights[k] == f {
				delete(c.flights, k)
			}
		}
		c.mu.Unlock()
		return nil, &net.DNSError{Err: ctx.Err().Error(), Name: k.name, IsTimeout: true, UnwrapErr: ctx.Err()}
	}
}

// fly asks the name servers for k, caches the answer and hands it to the
// flight's waiters. It ends within the time the resolver configuration
// grants a look-up (every attempt at every server timing out), or once
// every caller waiting for it gave up.
func (r *DNSResolver) fly(ctx context.Context, k cacheKey, qname dnsmessage.Name, f *flight) {
	defer f.cancel()
	conf := r.conf.get(r.now())
	ctx, cancel := context.WithTimeout(ctx, conf.lookupTimeout())
	defer cancel()
	ans, server, err := r.exchange(ctx, conf, dnsmessage.Question{Name: qname, Type: k.qtype, Class: dnsmessage.ClassINET})
	var ttl time.Duration
	switch {
	case err != nil:
		f.err = err
	case len(ans.addrs) > 0:
		f.addrs = ans.addrs
		ttl = clampTTL(ans.ttl, r.MinTTL, defaultMinTTL, r.MaxTTL, defaultMaxTTL)
	default:
		nf := notFound(k.name)
		nf.Server = server
		f.err = nf
		if ans.negTTL >= 0 {
			ttl = clampTTL(uint32(ans.negTTL), r.MinTTL, defaultMinTTL, r.MaxNegativeTTL, defaultMaxNegativeTTL)
		}
	}
	c := r.cache
	c.mu.Lock()
	if err == nil {
		c.putLocked(k, ans.addrs, ttl, r.now())
	}
	if c.flights[k] == f {
		delete(c.flights, k)
	}
	c.mu.Unlock()
	close(f.done)
}

func notFound(name string) *net.DNSError {
	return &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
}

// clampTTL turns a TTL in seconds into a duration within [lo, hi], a zero
// bound meaning its default.
func clampTTL(ttl uint32, lo, defLo, hi, defHi time.Duration) time.Duration {
	if lo == 0 {
		lo = defLo
	}
	if hi == 0 {
		hi = defHi
	}
	d := time.Duration(ttl) * time.Second
	return min(max(d, lo), hi)
}

// answer is what a name server said about one question.
type answer struct {
	truncated bool
	rcode     dnsmessage.RCode
	addrs     []netip.Addr // of the type asked for, at the end of the CNAME chain
	ttl       uint32       // least TTL of the records used, when addrs is not empty
	negTTL    int64        // negative TTL from the SOA record; -1 without one
}

// errMismatch is a reply to another query (another ID or question): a late
// answer, or a forgery, to be ignored.
var errMismatch = errors.New("dns: reply to another query")

// exchange asks the servers of conf, in turn, attempts times over, until
// one gives an answer that is not an error (NOERROR or NXDOMAIN). It
// returns the answer and the server that gave it.
func (r *DNSResolver) exchange(ctx context.Context, conf *dnsConf, q dnsmessage.Question) (answer, string, error) {
	var lastErr error
	for range conf.attempts {
		for _, server := range conf.servers {
			qctx, cancel := context.WithTimeout(ctx, conf.timeout)
			ans, err := r.exchangeOne(qctx, server, q)
			cancel()
			if err == nil {
				if ans.rcode == dnsmessage.RCodeSuccess || ans.rcode == dnsmessage.RCodeNameError {
					return ans, server, nil
				}
				err = &net.DNSError{Err: "server answered " + ans.rcode.String(), Name: q.Name.String(), Server: server, IsTemporary: true}
			}
			lastErr = err
			if ctx.Err() != nil {
				return answer{}, "", &net.DNSError{Err: "i/o timeout", Name: q.Name.String(), Server: server, IsTimeout: true, UnwrapErr: ctx.Err()}
			}
		}
	}
	return answer{}, "", lastErr
}

// exchangeOne asks server over UDP, and again over TCP when the answer
// comes truncated.
func (r *DNSResolver) exchangeOne(ctx context.Context, server string, q dnsmessage.Question) (answer, error) {
	id := uint16(rand.Uint32())
	query, err := newQuery(id, q)
	if err != nil {
		return answer{}, fmt.Errorf("dns: build query: %w", err)
	}
	ans, err := r.exchangeUDP(ctx, server, id, q, query)
	if err == nil && ans.truncated {
		ans, err = r.exchangeTCP(ctx, server, id, q, query)
	}
	if err != nil {
		return answer{}, dnsError(err, q.Name.String(), server)
	}
	return ans, nil
}

// dnsError wraps err as a *net.DNSError, a timeout when it is one.
func dnsError(err error, name, server string) error {
	var de *net.DNSError
	if errors.As(err, &de) {
		return err
	}
	var ne net.Error
	timeout := errors.As(err, &ne) && ne.Timeout() || errors.Is(err, context.DeadlineExceeded)
	return &net.DNSError{Err: err.Error(), Name: name, Server: server, IsTimeout: timeout, UnwrapErr: err}
}

func (r *DNSResolver) dial(ctx context.Context, network, server string) (net.Conn, error) {
	if r.DialContext != nil {
		return r.DialContext(ctx, network, server)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, server)
}

func (r *DNSResolver) exchangeUDP(ctx context.Context, server string, id uint16, q dnsmessage.Question, query []byte) (answer, error) {
	c, err := r.dial(ctx, "udp", server)
	if err != nil {
		return answer{}, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := c.Write(query); err != nil {
		return answer{}, err
	}
	buf := make([]byte, 4096)
	for {
		// The socket is connected: the kernel passes only datagrams from
		// the server's address and port.
		n, err := c.Read(buf)
		if err != nil {
			return answer{}, err
		}
		ans, err := parseAnswer(buf[:n], id, q)
		if errors.Is(err, errMismatch) {
			continue
		}
		return ans, err
	}
}

func (r *DNSResolver) exchangeTCP(ctx context.Context, server string, id uint16, q dnsmessage.Question, query []byte) (answer, error) {
	c, err := r.dial(ctx, "tcp", server)
	if err != nil {
		return answer{}, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	msg := make([]byte, 2+len(query))
	binary.BigEndian.PutUint16(msg, uint16(len(query)))
	copy(msg[2:], query)
	if _, err := c.Write(msg); err != nil {
		return answer{}, err
	}
	if _, err := io.ReadFull(c, msg[:2]); err != nil {
		return answer{}, err
	}
	reply := make([]byte, binary.BigEndian.Uint16(msg[:2]))
	if _, err := io.ReadFull(c, reply); err != nil {
		return answer{}, err
	}
	ans, err := parseAnswer(reply, id, q)
	if err != nil {
		return answer{}, err
	}
	if ans.truncated {
		return answer{}, errors.New("dns: truncated answer over TCP")
	}
	return ans, nil
}

// newQuery packs a recursive query for q with an EDNS(0) record.
func newQuery(id uint16, q dnsmessage.Question) ([]byte, error) {
	b := dnsmessage.NewBuilder(make([]byte, 0, 64), dnsmessage.Header{ID: id, RecursionDesired: true})
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if err := b.StartAdditionals(); err != nil {
		return nil, err
	}
	var rh dnsmessage.ResourceHeader
	if err := rh.SetEDNS0(ednsSize, dnsmessage.RCodeSuccess, false); err != nil {
		return nil, err
	}
	if err := b.OPTResource(rh, dnsmessage.OPTResource{}); err != nil {
		return nil, err
	}
	return b.Finish()
}

// parseAnswer reads the reply msg to the query id for q. It returns
// errMismatch for a reply to anything else, and an error for a malformed
// reply. For a truncated reply it returns only truncated; for an RCODE
// other than NOERROR and NXDOMAIN only rcode. Otherwise addrs are the
// addresses of q's type found by following the CNAME chain from q's name
// through the answer section (records of other names are ignored: they
// cannot be trusted for names the server was not asked about), and negTTL
// the SOA record's negative TTL when addrs is empty.
func parseAnswer(msg []byte, id uint16, q dnsmessage.Question) (answer, error) {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		return answer{}, fmt.Errorf("dns: malformed reply: %w", err)
	}
	if h.ID != id || !h.Response {
		return answer{}, errMismatch
	}
	qs, err := p.AllQuestions()
	if err != nil {
		return answer{}, fmt.Errorf("dns: malformed reply: %w", err)
	}
	if len(qs) != 1 || qs[0].Type != q.Type || qs[0].Class != q.Class || !strings.EqualFold(qs[0].Name.String(), q.Name.String()) {
		return answer{}, errMismatch
	}
	if h.Truncated {
		return answer{truncated: true, negTTL: -1}, nil
	}
	if h.OpCode != 0 {
		return answer{}, fmt.Errorf("dns: reply with opcode %d", h.OpCode)
	}
	ans := answer{rcode: h.RCode, negTTL: -1}
	if h.RCode != dnsmessage.RCodeSuccess && h.RCode != dnsmessage.RCodeNameError {
		return ans, nil
	}

	type record struct {
		name   string
		typ    dnsmessage.Type
		ttl    uint32
		addr   netip.Addr
		target string
	}
	var records []record
	for {
		rh, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return answer{}, fmt.Errorf("dns: malformed reply: %w", err)
		}
		rec := record{name: strings.ToLower(rh.Name.String()), typ: rh.Type, ttl: rh.TTL}
		switch {
		case rh.Class != dnsmessage.ClassINET:
			err = p.SkipAnswer()
			rec.typ = 0
		case rh.Type == dnsmessage.TypeA:
			var a dnsmessage.AResource
			a, err = p.AResource()
			rec.addr = netip.AddrFrom4(a.A)
		case rh.Type == dnsmessage.TypeAAAA:
			var a dnsmessage.AAAAResource
			a, err = p.AAAAResource()
			rec.addr = netip.AddrFrom16(a.AAAA)
		case rh.Type == dnsmessage.TypeCNAME:
			var c dnsmessage.CNAMEResource
			c, err = p.CNAMEResource()
			rec.target = strings.ToLower(c.CNAME.String())
		default:
			err = p.SkipAnswer()
			rec.typ = 0
		}
		if err != nil {
			return answer{}, fmt.Errorf("dns: malformed reply: %w", err)
		}
		if rec.typ != 0 {
			records = append(records, rec)
		}
	}

	name := strings.ToLower(q.Name.String())
	ttl := ^uint32(0)
chain:
	for range maxCNAMEs + 1 {
		if h.RCode == dnsmessage.RCodeNameError {
			break // the name, or the end of its chain, does not exist
		}
		for _, rec := range records {
			if rec.typ == q.Type && rec.name == name && len(ans.addrs) < maxAnswerAddrs {
				ans.addrs = append(ans.addrs, rec.addr)
				ttl = min(ttl, rec.ttl)
			}
		}
		if len(ans.addrs) > 0 {
			break
		}
		for _, rec := range records {
			if rec.typ == dnsmessage.TypeCNAME && rec.name == name {
				name, ttl = rec.target, min(ttl, rec.ttl)
				continue chain
			}
		}
		break
	}
	if len(ans.addrs) > 0 {
		ans.ttl = ttl
		return ans, nil
	}

	for {
		rh, err := p.AuthorityHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return answer{}, fmt.Errorf("dns: malformed reply: %w", err)
		}
		if rh.Type != dnsmessage.TypeSOA || rh.Class != dnsmessage.ClassINET {
			if err := p.SkipAuthority(); err != nil {
				return answer{}, fmt.Errorf("dns: malformed reply: %w", err)
			}
			continue
		}
		soa, err := p.SOAResource()
		if err != nil {
			return answer{}, fmt.Errorf("dns: malformed reply: %w", err)
		}
		ans.negTTL = int64(min(rh.TTL, soa.MinTTL))
		break
	}
	return ans, nil
}

// dnsConf is what the resolver uses of a resolv.conf file.
type dnsConf struct {
	servers  []string // "ip:53"
	timeout  time.Duration
	attempts int
}

// lookupTimeout is the most one look-up can take.
func (c *dnsConf) lookupTimeout() time.Duration {
	return c.timeout * time.Duration(c.attempts*len(c.servers))
}

// confFile is the resolv.conf file, read again when it changes.
type confFile struct {
	path string

	mu      sync.Mutex
	conf    *dnsConf
	checked time.Time
	modTime time.Time
	size    int64
}

// get returns the configuration, read again from the file when it has
// changed since it was last read (looked at every resolvConfCheck).
func (f *confFile) get(now time.Time) *dnsConf {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conf != nil && now.Sub(f.checked) < resolvConfCheck && !now.Before(f.checked) {
		return f.conf
	}
	f.checked = now
	fi, err := os.Stat(f.path)
	if f.conf != nil && err == nil && fi.ModTime().Equal(f.modTime) && fi.Size() == f.size {
		return f.conf
	}
	if err == nil {
		f.modTime, f.size = fi.ModTime(), fi.Size()
	}
	data, err := os.ReadFile(f.path)
	if err != nil {
		data = nil // no file: the defaults
	}
	f.conf = parseResolvConf(data)
	return f.conf
}

// parseResolvConf reads the nameserver lines and the timeout and attempts
// options of a resolv.conf file, with the C library's defaults and limits.
func parseResolvConf(data []byte) *dnsConf {
	c := &dnsConf{timeout: 5 * time.Second, attempts: 2}
	sc := bufio.NewScanner(strings.NewReader(string(data)))
	for sc.Scan() {
		line := sc.Text()
		if i := strings.IndexAny(line, "#;"); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "nameserver":
			if a, err := netip.ParseAddr(f[1]); err == nil && len(c.servers) < 3 {
				c.servers = append(c.servers, netip.AddrPortFrom(a, 53).String())
			}
		case "options":
			for _, o := range f[1:] {
				k, v, _ := strings.Cut(o, ":")
				n, err := strconv.Atoi(v)
				if err != nil {
					continue
				}
				switch k {
				case "timeout":
					c.timeout = time.Duration(min(max(n, 1), 30)) * time.Second
				case "attempts":
					c.attempts = min(max(n, 1), 5)
				}
			}
		}
	}
	if len(c.servers) == 0 {
		c.servers = []string{"127.0.0.1:53", "[::1]:53"}
	}
	return c
}
