package sniff

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// MaxHTTP1Bytes is the most bytes of an HTTP/1.x request head — the request
// line, the header fields and the empty line that ends them — that
// ParseHTTP1 reads. A head that is not complete within this many bytes is
// ErrMalformed.
const MaxHTTP1Bytes = 16 << 10

const (
	// http1MaxMethod is the longest method ParseHTTP1 accepts. The longest
	// registered method is 17 bytes ("UPDATEREDIRECTREF").
	http1MaxMethod = 24
	// http1MaxBodyScan bounds the body bytes searched for a "jsonrpc"
	// member.
	http1MaxBodyScan = 4 << 10
	// http1H2Preface is how the HTTP/2 client connection preface starts.
	// It parses as an HTTP/1 request line but belongs to ParseH2C.
	http1H2Preface = "PRI * HTTP/2.0"
)

// Errors for the hot paths are built once: a dispatcher calls ParseHTTP1 on
// every new connection and again after every read.
var (
	errHTTP1NeedMore  = fmt.Errorf("sniff: http: incomplete request head: %w", ErrNeedMore)
	errHTTP1NoMethod  = fmt.Errorf("sniff: http: no request method: %w", ErrNotProtocol)
	errHTTP1H2Preface = fmt.Errorf("sniff: http: HTTP/2 connection preface: %w", ErrNotProtocol)
	errHTTP1TooLarge  = fmt.Errorf("sniff: http: request head exceeds %d bytes: %w", MaxHTTP1Bytes, ErrMalformed)
	errHTTP1NoName    = fmt.Errorf("sniff: http: request names no host: %w", ErrNoName)
)

// http1Malformed returns an ErrMalformed for a reason. The reason never
// quotes more than one byte of the untrusted input, so that errors are safe
// and short to log.
func http1Malformed(format string, args ...any) error {
	return fmt.Errorf("sniff: http: "+format+": %w", append(args, ErrMalformed)...)
}

// ParseHTTP1 parses b, the bytes a client has sent so far, as the head of an
// HTTP/1.0 or HTTP/1.1 request and returns the host it names. It does not
// retain or modify b and is safe for concurrent use.
//
// The request line must be a method of uppercase letters (after the first,
// also '-' and '_'), one space, a request target, one space and HTTP/1.0 or
// HTTP/1.1; lines end in CRLF or a bare LF, as net/http accepts. Anything
// whose first bytes cannot start such a method, and the HTTP/2 preface
// ("PRI * HTTP/2.0"), is ErrNotProtocol, decided on the first byte that
// shows it. Once the method and its space are read the bytes are HTTP:
// every other failure is ErrMalformed, reported as soon as the offending
// byte is seen; obsolete line folding and the HTTP/0.9 request line are
// malformed.
//
// The name is the authority of an absolute-form (or CONNECT authority-form)
// request target (RFC 9112 section 3.2.2), else the value of the one Host
// header field; it is normalised: port removed, lowercased, one trailing
// dot removed, an IPv6 literal without brackets and in canonical form. Host
// names are dot-separated labels of letters, digits, '-' and '_'. More than
// one Host field, an invalid Host, a Host (even an empty one) that names
// another host than the target's authority (compared normalised, so the
// port does not count; ParseH2C applies the same rule to host and
// :authority), userinfo in the target, or an HTTP/1.1 request without Host
// (except CONNECT, as in net/http) is ErrMalformed. An HTTP/1.0 request
// without Host, or an empty Host with an origin-form target, is ErrNoName.
//
// Result.Class is "socketio", "websocket", "grpc-web", "soap" or "jsonrpc",
// checked in that order; "jsonrpc" is only reported when body bytes already
// in b (at most the first 4 KiB) contain a "jsonrpc" member: ParseHTTP1
// never waits for a body.
//
// Result.Protocol is HTTP with a nil error, ErrNoName and ErrMalformed, and
// with ErrNeedMore once the method and its space have been read (unless b
// may still be the HTTP/2 preface); otherwise it is Unknown.
// Result.Name is set only with a nil error.
func ParseHTTP1(b []byte) (Result, error) {
	var s http1State
	return s.parse(b)
}

// http1Head is what ParseHTTP1 has learnt from a request head up to the
// start of a header line. Its slices alias the bytes parsed.
type http1Head struct {
	method       []byte
	minor        byte   // '0' or '1'
	host         []byte // the target's authority, else the Host field value
	hasAuthority bool
	path         []byte
	hosts        int    // Host fields
	hostField    []byte // the Host field value, when hosts == 1
	ctype        []byte
	haveCtype    bool
	websocket    bool
	soap         bool
}

// http1State is ParseHTTP1's progress through the growing bytes of one
// connection: each call of parse must get the bytes of the previous call
// and possibly more. Once the request line is parsed it keeps what the
// complete lines showed and goes on from the first incomplete line, and it
// waits for that line's end (or the byte cap) before parsing again, so that
// Read's work for a whole head is linear in its bytes. A malformed byte in
// an incomplete line is therefore reported when the line ends, or at
// MaxHTTP1Bytes or the sniff deadline, rather than at once. The zero value
// starts at the first byte.
type http1State struct {
	head http1Head
	line int // start of the first header line not parsed; 0 before the request line is
	// ready's wait: parse runs again once len(b) reaches next or a '\n'
	// arrives after scan (b[line:scan] holds none).
	next, scan int
}

// ready reports whether b, the bytes last parsed and possibly more, may
// change parse's answer. It scans each byte for a line end once.
func (s *http1State) ready(b []byte) bool {
	if len(b) >= s.next || s.scan < len(b) && bytes.IndexByte(b[s.scan:], '\n') >= 0 {
		return true
	}
	s.scan = len(b)
	return false
}

// resume returns the offset in b from which the next parse reads bytes it
// has not parsed before.
func (s *http1State) resume() int { return s.line }

// parse is ParseHTTP1 on b, resuming at the first incomplete line.
func (s *http1State) parse(b []byte) (Result, error) {
	// The method is decided byte by byte so that a dispatcher learns "not
	// HTTP" from the first byte of a TLS record or an SSH banner.
	m := 0
	for {
		if m == len(b) {
			s.next = len(b) + 1
			return Result{}, errHTTP1NeedMore
		}
		c := b[m]
		if c == ' ' && m > 0 {
			break
		}
		if m == http1MaxMethod || !http1MethodByte(c, m == 0) {
			return Result{}, errHTTP1NoMethod
		}
		m++
	}
	if n := min(len(b), len(http1H2Preface)); string(b[:n]) == http1H2Preface[:n] {
		if n == len(http1H2Preface) {
			return Result{}, errHTTP1H2Preface
		}
		s.next = len(b) + 1
		return Result{}, errHTTP1NeedMore
	}

	res := Result{Protocol: HTTP}
	w := b
	if len(w) > MaxHTTP1Bytes {
		w = w[:MaxHTTP1Bytes]
	}
	// more is the outcome when w ends before the head does: no '\n' after
	// s.line, so parse waits for one.
	more := func() (Result, error) {
		if len(b) >= MaxHTTP1Bytes {
			return res, errHTTP1TooLarge
		}
		s.next, s.scan = MaxHTTP1Bytes, len(w)
		return res, errHTTP1NeedMore
	}

	h := s.head
	p := s.line
	if p == 0 {
		var err error
		if h, p, err = http1RequestLine(w, m); err != nil {
			if err == errHTTP1NeedMore {
				return more()
			}
			return res, err
		}
	}

	// Header fields, up to the empty line.
	var err error
	for {
		s.head, s.line = h, p
		if p == len(w) {
			return more()
		}
		if c := w[p]; c == '\n' || c == '\r' {
			p, err = http1LineEnd(w, p, "header block")
			if err != nil {
				if err == errHTTP1NeedMore {
					return more()
				}
				return res, err
			}
			break
		}
		ns := p
		for ; p < len(w) && w[p] != ':'; p++ {
			if !http1Token[w[p]] {
				// Also a space or tab: before the colon (RFC 9112
				// section 5.1) or at the start of the line (obs-fold).
				return res, http1Malformed("byte %q in header field name", w[p])
			}
		}
		if p == len(w) {
			return more()
		}
		if p == ns {
			return res, http1Malformed("empty header field name")
		}
		field := w[ns:p]
		p++
		vs := p
		for ; p < len(w) && w[p] != '\n'; p++ {
			c := w[p]
			if c == '\r' {
				if p+1 < len(w) && w[p+1] != '\n' {
					return res, http1Malformed("bare CR in header field value")
				}
				continue
			}
			if c < ' ' && c != '\t' || c == 0x7f {
				return res, http1Malformed("byte %q in header field value", c)
			}
		}
		if p == len(w) {
			return more()
		}
		ve := p
		if ve > vs && w[ve-1] == '\r' {
			ve--
		}
		p++
		value := http1TrimOWS(w[vs:ve])

		switch {
		case httpEqualFold(field, "host"):
			// RFC 9112 section 3.2: more than one Host, or an invalid
			// one, is a 400, even when the target's authority wins.
			if h.hosts++; h.hosts > 1 {
				return res, http1Malformed("more than one Host header field")
			}
			if len(value) > 0 {
				if err := httpCheckHost(value); err != nil {
					return res, http1Malformed("Host: %w", err)
				}
			}
			h.hostField = value
			if !h.hasAuthority {
				h.host = value
			}
		case httpEqualFold(field, "upgrade"):
			h.websocket = h.websocket || http1ListHas(value, "websocket")
		case httpEqualFold(field, "content-type"):
			if !h.haveCtype {
				h.ctype, h.haveCtype = value, true
			}
		case httpEqualFold(field, "soapaction"):
			h.soap = true
		}
	}
	if h.hosts == 0 && h.minor == '1' && string(h.method) != "CONNECT" {
		// RFC 9112 section 3.2: a server MUST answer 400, whatever the
		// target's form. net/http makes the same exception for CONNECT.
		return res, http1Malformed("HTTP/1.1 request without Host")
	}

	res.Class = http1Class(h.path, h.ctype, h.websocket, h.soap, b[p:])
	if len(h.host) == 0 {
		return res, errHTTP1NoName
	}
	if res.Name, err = httpHostName(h.host); err != nil {
		// Unreachable: host passed httpCheckHost.
		return Result{Protocol: HTTP}, http1Malformed("host: %w", err)
	}
	if h.hasAuthority && h.hosts == 1 {
		// The rule ParseH2C applies to host and :authority (RFC 9113
		// section 8.3.1): a Host field, even an empty one, must name the
		// target's host. Routing on the target while a backend that
		// ignores it serves Host would be a confused deputy.
		if name, err := httpHostName(h.hostField); err != nil || name != res.Name {
			return Result{Protocol: HTTP}, http1Malformed("Host header field does not match the request target")
		}
	}
	return res, nil
}

// http1RequestLine parses the request line in w, whose method ends at
// w[m] (a space), and returns what it shows and the offset after it, or
// errHTTP1NeedMore if w ends first.
func http1RequestLine(w []byte, m int) (http1Head, int, error) {
	h := http1Head{method: w[:m]}
	// Request target: visible bytes up to the next space. A line end here
	// is an HTTP/0.9 request line.
	p := m + 1
	ts := p
	for ; p < len(w) && w[p] != ' '; p++ {
		if c := w[p]; c <= ' ' || c == 0x7f {
			return h, 0, http1Malformed("byte %q in request target", c)
		}
	}
	if p == len(w) {
		return h, 0, errHTTP1NeedMore
	}
	if p == ts {
		return h, 0, http1Malformed("empty request target")
	}
	target := w[ts:p]
	p++

	// Version: HTTP/1.0 or HTTP/1.1, then the line end.
	const version = "HTTP/1."
	for i := 0; i < len(version); i, p = i+1, p+1 {
		if p == len(w) {
			return h, 0, errHTTP1NeedMore
		}
		if w[p] != version[i] {
			return h, 0, http1Malformed("unsupported version")
		}
	}
	if p == len(w) {
		return h, 0, errHTTP1NeedMore
	}
	h.minor = w[p]
	if h.minor != '0' && h.minor != '1' {
		return h, 0, http1Malformed("unsupported version")
	}
	p++
	p, err := http1LineEnd(w, p, "request line")
	if err != nil {
		return h, 0, err
	}

	// The request target's form decides where the name comes from and what
	// the path is. Hosts are validated as soon as they are read, and turned
	// into the name (an allocation) only once the head is complete.
	switch {
	case target[0] == '/':
		h.path = target
	case len(target) == 1 && target[0] == '*':
		if string(h.method) != "OPTIONS" {
			return h, 0, http1Malformed("asterisk-form target with method other than OPTIONS")
		}
	default:
		// RFC 9112 section 3.2.2: the target's authority replaces Host.
		authority := target
		if string(h.method) != "CONNECT" {
			var ok bool
			if authority, h.path, ok = http1AbsoluteForm(target); !ok {
				return h, 0, http1Malformed("invalid request target")
			}
		}
		if len(authority) == 0 {
			return h, 0, http1Malformed("empty authority in request target")
		}
		if err := httpCheckHost(authority); err != nil {
			return h, 0, http1Malformed("request target authority: %w", err)
		}
		h.host, h.hasAuthority = authority, true
	}
	return h, p, nil
}

// http1MethodByte reports whether c may be in a method: an uppercase
// letter, or after the first byte also '-' or '_'. RFC 9110 allows any
// token, but methods in use are uppercase, and a narrow alphabet lets a
// dispatcher reject other protocols on their first bytes.
func http1MethodByte(c byte, first bool) bool {
	return 'A' <= c && c <= 'Z' || !first && (c == '-' || c == '_')
}

// http1LineEnd reads the line end at w[p], CRLF or a bare LF, and returns
// the offset after it. what names the line for the error.
func http1LineEnd(w []byte, p int, what string) (int, error) {
	if p == len(w) {
		return p, errHTTP1NeedMore
	}
	switch w[p] {
	case '\n':
		return p + 1, nil
	case '\r':
		if p+1 == len(w) {
			return p, errHTTP1NeedMore
		}
		if w[p+1] == '\n' {
			return p + 2, nil
		}
	}
	return p, http1Malformed("byte %q at end of %s", w[p], what)
}

// http1Token holds the RFC 9110 tchar bytes.
var http1Token = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range []byte("!#$%&'*+-.^_`|~") {
		t[c] = true
	}
	return t
}()

// http1TrimOWS trims spaces and tabs from both ends of v.
func http1TrimOWS(v []byte) []byte {
	for len(v) > 0 && (v[0] == ' ' || v[0] == '\t') {
		v = v[1:]
	}
	for len(v) > 0 && (v[len(v)-1] == ' ' || v[len(v)-1] == '\t') {
		v = v[:len(v)-1]
	}
	return v
}

// http1ListHas reports whether the comma-separated list v has elem,
// compared ASCII case-insensitively.
func http1ListHas(v []byte, elem string) bool {
	for len(v) > 0 {
		e := v
		if i := bytes.IndexByte(v, ','); i >= 0 {
			e, v = v[:i], v[i+1:]
		} else {
			v = nil
		}
		if httpEqualFold(http1TrimOWS(e), elem) {
			return true
		}
	}
	return false
}

// http1AbsoluteForm splits an absolute-form request target
// scheme "://" authority [path] into its authority and the rest. It fails
// for other targets and for an authority with userinfo, which RFC 9110
// section 4.2.4 says to treat as an error (it is also a classic way to
// disguise a host).
func http1AbsoluteForm(t []byte) (authority, rest []byte, ok bool) {
	i := 0
	for ; i < len(t); i++ {
		c := t[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' ||
			i > 0 && ('0' <= c && c <= '9' || c == '+' || c == '-' || c == '.') {
			continue
		}
		break
	}
	if i == 0 || !bytes.HasPrefix(t[i:], []byte("://")) {
		return nil, nil, false
	}
	t = t[i+3:]
	end := len(t)
	if j := bytes.IndexAny(t, "/?#"); j >= 0 {
		end = j
	}
	if bytes.IndexByte(t[:end], '@') >= 0 {
		return nil, nil, false
	}
	return t[:end], t[end:], true
}

// http1Class returns the Result.Class of a request.
func http1Class(path, ctype []byte, websocket, soap bool, body []byte) string {
	mt := ctype
	if i := bytes.IndexByte(mt, ';'); i >= 0 {
		mt = http1TrimOWS(mt[:i])
	}
	switch {
	case http1SocketIO(path):
		return "socketio"
	case websocket:
		return "websocket"
	case httpHasPrefixFold(ctype, "application/grpc-web"):
		return "grpc-web"
	case soap || httpEqualFold(mt, "application/soap+xml"):
		return "soap"
	case http1JSON(mt) && http1JSONRPC(body):
		return "jsonrpc"
	}
	return ""
}

// http1SocketIO reports whether the path and query of a request target are
// an Engine.IO (socket.io) request: path under /socket.io/ and an EIO
// query parameter.
func http1SocketIO(target []byte) bool {
	const prefix = "/socket.io/"
	if !bytes.HasPrefix(target, []byte(prefix)) {
		return false
	}
	q := target[len(prefix):]
	i := bytes.IndexByte(q, '?')
	if i < 0 {
		return false
	}
	q = q[i+1:]
	if j := bytes.IndexByte(q, '#'); j >= 0 {
		q = q[:j]
	}
	for len(q) > 0 {
		e := q
		if j := bytes.IndexByte(q, '&'); j >= 0 {
			e, q = q[:j], q[j+1:]
		} else {
			q = nil
		}
		if bytes.HasPrefix(e, []byte("EIO=")) {
			return true
		}
	}
	return false
}

// http1JSON reports whether the media type mt is JSON.
func http1JSON(mt []byte) bool {
	return httpEqualFold(mt, "application/json") ||
		httpEqualFold(mt, "application/json-rpc") ||
		httpEqualFold(mt, "application/jsonrequest") ||
		len(mt) > len("+json") && httpEqualFold(mt[len(mt)-len("+json"):], "+json")
}

// http1JSONRPC reports whether the body bytes received so far (at most the
// first http1MaxBodyScan) hold a "jsonrpc" object member. It does not parse
// JSON: the class is a label for logs.
func http1JSONRPC(body []byte) bool {
	const member = `"jsonrpc"`
	if len(body) > http1MaxBodyScan {
		body = body[:http1MaxBodyScan]
	}
	for {
		i := bytes.Index(body, []byte(member))
		if i < 0 {
			return false
		}
		body = body[i+len(member):]
		j := 0
		for j < len(body) && (body[j] == ' ' || body[j] == '\t' || body[j] == '\r' || body[j] == '\n') {
			j++
		}
		if j < len(body) && body[j] == ':' {
			return true
		}
	}
}

// httpEqualFold reports whether s equals the lowercase ASCII string lower,
// ignoring ASCII case.
func httpEqualFold[S ~string | ~[]byte](s S, lower string) bool {
	return len(s) == len(lower) && httpHasPrefixFold(s, lower)
}

// httpHasPrefixFold reports whether s starts with the lowercase ASCII
// string lower, ignoring ASCII case.
func httpHasPrefixFold[S ~string | ~[]byte](s S, lower string) bool {
	if len(s) < len(lower) {
		return false
	}
	for i := 0; i < len(lower); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

// httpHostName returns the name in h, a Host header value or the
// authority of a request target (uri-host [":" port]), normalised: port
// removed, lowercased, one trailing dot removed, an IPv6 literal without
// brackets and in canonical form. h must not be empty.
//
// A name is dot-separated labels of 1 to 63 letters, digits, '-' or '_', at
// most 253 bytes; an IP address literal is [IPv6] (without zone) or a
// dotted IPv4 address, which is a name by that rule. Percent-encoding,
// other sub-delims and non-ASCII bytes are rejected: the name must compare
// equal to a configured route and to a TLS server_name.
func httpHostName[S ~string | ~[]byte](h S) (string, error) {
	host, ip6, err := httpSplitHost(h)
	if err != nil {
		return "", err
	}
	if ip6 {
		a, err := netip.ParseAddr(string(host))
		if err != nil || !a.Is6() || a.Zone() != "" {
			return "", errors.New("invalid IPv6 literal")
		}
		return a.String(), nil
	}
	upper := false
	for i := 0; i < len(host); i++ {
		if 'A' <= host[i] && host[i] <= 'Z' {
			upper = true
			break
		}
	}
	if !upper {
		return string(host), nil
	}
	var sb strings.Builder
	sb.Grow(len(host))
	for i := 0; i < len(host); i++ {
		c := host[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		sb.WriteByte(c)
	}
	return sb.String(), nil
}

// httpCheckHost validates h as httpHostName does, without building the
// name.
func httpCheckHost[S ~string | ~[]byte](h S) error {
	host, ip6, err := httpSplitHost(h)
	if err == nil && ip6 {
		if a, perr := netip.ParseAddr(string(host)); perr != nil || !a.Is6() || a.Zone() != "" {
			return errors.New("invalid IPv6 literal")
		}
	}
	return err
}

// httpSplitHost removes the port from h and validates the port and, unless
// ip6 (the host was in brackets, which are removed), the host name; it
// removes one trailing dot from a name.
func httpSplitHost[S ~string | ~[]byte](h S) (host S, ip6 bool, err error) {
	var port S
	if len(h) > 0 && h[0] == '[' {
		end := -1
		for i := 1; i < len(h); i++ {
			if h[i] == ']' {
				end = i
				break
			}
		}
		if end < 0 {
			return host, false, errors.New("unclosed IPv6 literal")
		}
		host, port, ip6 = h[1:end], h[end+1:], true
		if len(port) > 0 && port[0] != ':' {
			return host, false, fmt.Errorf("byte %q after IPv6 literal", port[0])
		}
	} else {
		host = h
		for i := 0; i < len(h); i++ {
			if h[i] == ':' {
				host, port = h[:i], h[i:]
				break
			}
		}
	}
	if len(port) > 0 {
		// port = *DIGIT (RFC 3986), so "host:" is valid.
		if len(port) > 6 {
			return host, false, errors.New("port too long")
		}
		n := 0
		for i := 1; i < len(port); i++ {
			c := port[i]
			if c < '0' || c > '9' {
				return host, false, fmt.Errorf("byte %q in port", c)
			}
			n = n*10 + int(c-'0')
		}
		if n > 65535 {
			return host, false, errors.New("port out of range")
		}
	}
	if ip6 {
		return host, true, nil
	}

	if len(host) > 0 && host[len(host)-1] == '.' {
		host = host[:len(host)-1]
	}
	if len(host) == 0 {
		return host, false, errors.New("empty host")
	}
	if len(host) > 253 {
		return host, false, errors.New("host longer than 253 bytes")
	}
	label := 0
	for i := 0; i < len(host); i++ {
		switch c := host[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_':
			label++
			if label > 63 {
				return host, false, errors.New("host label longer than 63 bytes")
			}
		case c == '.':
			if label == 0 {
				return host, false, errors.New("empty host label")
			}
			label = 0
		default:
			return host, false, fmt.Errorf("byte %q in host", c)
		}
	}
	if label == 0 {
		return host, false, errors.New("empty host label")
	}
	return host, false, nil
}
