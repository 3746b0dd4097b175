package sniff

import (
	"fmt"

	"golang.org/x/crypto/cryptobyte"
)

// MaxTLSBytes is the most bytes the caller buffers for a ClientHello (record
// headers included). ParseTLS never returns ErrNeedMore for a ClientHello that
// cannot be complete within MaxTLSBytes bytes: it returns ErrMalformed as soon
// as it can tell, and at the latest once len(b) >= MaxTLSBytes.
//
// A ClientHello body is at most 65536 bytes (crypto/tls's bound); the cap fits
// the largest one framed in records of 6 bytes or more, and real clients use
// records of hundreds of bytes at least.
const MaxTLSBytes = 1 << 17

// Bounds and code points from RFC 8446 and crypto/tls (common.go).
const (
	tlsRecordTypeHandshake = 0x16
	tlsRecordVersionMajor  = 3
	tlsRecordHeaderLen     = 5
	tlsMaxRecordLen        = 16384 // crypto/tls maxPlaintext
	tlsHandshakeHeaderLen  = 4     // msg_type, uint24 length
	tlsMaxHandshakeLen     = 65536 // crypto/tls maxHandshake
	tlsTypeClientHello     = 1
	tlsMaxSessionIDLen     = 32
	tlsExtServerName       = 0
	tlsExtALPN             = 16
	tlsExtEncryptedHello   = 0xfe0d
	tlsNameTypeHostName    = 0
	tlsMaxNameLen          = 253 // a DNS name in text form, without the trailing dot
	tlsMaxLabelLen         = 63
	tlsMaxALPNLen          = 64 // cap on Result.ALPN
	tlsMaxQuotedName       = 64 // cap on a bad name quoted in an error
)

// Errors returned on hot paths are built once: ParseTLS is called after every
// read of a connection's first bytes and must not allocate to say "not yet" or
// "not TLS".
var (
	errTLSNeedMore     = fmt.Errorf("sniff: tls: incomplete client hello: %w", ErrNeedMore)
	errTLSNotHandshake = fmt.Errorf("sniff: tls: first record is not a handshake record: %w", ErrNotProtocol)
	errTLSNotVersion3  = fmt.Errorf("sniff: tls: record version is not 3.x: %w", ErrNotProtocol)
	errTLSNoName       = fmt.Errorf("sniff: tls: client hello has no host_name: %w", ErrNoName)
)

// tlsMalformed returns ErrMalformed wrapped with what was wrong. It allocates;
// it is only called on the way out of a broken ClientHello.
func tlsMalformed(format string, args ...any) error {
	return fmt.Errorf("sniff: tls: "+format+": %w", append(args, ErrMalformed)...)
}

// ParseTLS parses the TLS records at the start of b (the bytes a client sent
// so far) as a ClientHello and reports the server_name (SNI) it asks for.
//
// b is not modified and not retained; the returned strings do not alias it.
// It is safe to call concurrently. Bytes after the ClientHello (for example
// early data) are ignored.
//
// The outcomes:
//   - ErrNotProtocol, with a zero Result: b does not start with a TLS
//     handshake record (first byte 0x16, record version 3.x). Deciding this
//     reads at most two bytes, so callers may probe any prefix, even of length 1.
//   - ErrNeedMore, with Protocol TLS (a zero Result if b is empty): b is a
//     valid prefix of a ClientHello that can still end within MaxTLSBytes.
//     Call again with more bytes.
//   - ErrMalformed, with Protocol TLS: a broken or oversized record layer or
//     ClientHello, a record of another type before the ClientHello is
//     complete, or an invalid host name.
//   - ErrNoName: a well-formed ClientHello without a host_name; Protocol, ALPN
//     and ECH are set.
//   - nil: Protocol, Name, ALPN and ECH are set and Name is not empty.
//
// The record layer follows crypto/tls: a ClientHello may span any number of
// handshake records, each 1 to 16384 bytes long, and its body is at most
// 65536 bytes. The body is parsed the way crypto/tls's clientHelloMsg.unmarshal
// does: every length checked, a session ID of at most 32 bytes, an even-length
// cipher suite list, an extensions block that ends the message exactly, no
// duplicate extension types. The server_name and ALPN extensions are checked
// as crypto/tls checks them; other extensions are only framed, since the
// backend's TLS stack, not the router, is the judge of their contents.
//
// Name is the single host_name entry, lowercased (ASCII), with one trailing
// dot removed. It must be at most 253 bytes of labels of 1 to 63 bytes from
// [A-Za-z0-9_-] separated by dots. Underscores and labels that start or end
// with a hyphen are accepted, as they occur in real DNS names and crypto/tls
// accepts them; anything else (spaces, '*', ':', bytes >= 0x80, empty labels)
// is ErrMalformed. An IPv4 literal passes (routing refuses it later).
//
// ALPN is the offered protocol list joined by ",", cut at a protocol boundary
// to at most 64 bytes (a first protocol longer than that is cut at 64 bytes).
// Bytes outside printable ASCII, and commas, are shown as '?': the field is
// for logs. ECH reports an encrypted_client_hello extension; Name is then the
// outer (public) name.
//
// Where ParseTLS and crypto/tls's server differ (crypto/tls can be the
// backend's TLS stack, and is the differential oracle in the tests):
//   - Stricter: every record before the ClientHello is complete must be a
//     handshake record of version 3.x (crypto/tls takes any version below
//     0x1000 and drops warning alerts between fragments); the session ID is
//     at most 32 bytes (crypto/tls takes 255); the host name rules above
//     (crypto/tls takes any bytes but a trailing dot); the ClientHello must
//     end within MaxTLSBytes.
//   - More lenient: one trailing dot is removed (crypto/tls rejects it); the
//     contents of extensions other than server_name and ALPN are not checked
//     (crypto/tls checks those it knows, e.g. key_share, pre_shared_key being
//     last, encrypted_client_hello's framing); the result is decided once the
//     ClientHello's bytes are in, without waiting for the rest of a record
//     that claims more.
//
// Cost: a complete single-record ClientHello is parsed in place with one
// allocation (Name and ALPN share it); a ClientHello split over several
// records is first copied into one buffer. ParseTLS walks the record headers
// from the start on every call, without allocating until the ClientHello is
// complete. Read does not call it after every read: it keeps a tlsState,
// which resumes the walk after the last complete record and waits for the
// next byte that can change the answer, so the work for a whole ClientHello
// is linear in its bytes however it is cut into records and reads.
func ParseTLS(b []byte) (Result, error) {
	var s tlsState
	return s.parse(b)
}

// tlsState is ParseTLS's progress through the growing bytes of one
// connection: each call of parse must get the bytes of the previous call
// and possibly more. The zero value starts at the first byte.
type tlsState struct {
	walk tlsWalk
	// next is the length b must reach before parse can answer other than
	// ErrNeedMore: every shorter extension of the bytes last parsed gets
	// ErrNeedMore again.
	next int
}

// ready reports whether b, the bytes last parsed and possibly more, may
// change parse's answer.
func (s *tlsState) ready(b []byte) bool { return len(b) >= s.next }

// resume returns the offset in b from which the next parse reads bytes it
// has not walked before.
func (s *tlsState) resume() int { return s.walk.off }

// parse is ParseTLS on b, resuming where the last call stopped.
func (s *tlsState) parse(b []byte) (Result, error) {
	if len(b) == 0 {
		s.next = 1
		return Result{}, errTLSNeedMore
	}
	if b[0] != tlsRecordTypeHandshake {
		return Result{}, errTLSNotHandshake
	}
	if len(b) > 1 && b[1] != tlsRecordVersionMajor {
		return Result{}, errTLSNotVersion3
	}
	res := Result{Protocol: TLS}
	msg, next, err := s.walk.message(b)
	if err != nil {
		s.next = min(next, MaxTLSBytes)
		return res, err
	}
	return parseClientHello(msg, res)
}

// tlsWalk walks the handshake records at the start of a connection's bytes
// to find the first handshake message. It keeps what the complete records
// walked so far showed, so that a call with more bytes goes on from there.
type tlsWalk struct {
	hdr     [tlsHandshakeHeaderLen]byte // the handshake header, gathered across records
	have    int                         // handshake bytes in the records walked
	need    int                         // total handshake bytes, once the header is in; else 0
	off     int                         // end of the records walked
	records int                         // records walked
}

// message returns the first handshake message (header included) carried by
// the handshake records at the start of b, which starts with a handshake
// record header of version 3.x and extends the bytes of the last call. If
// the message is in the first record the result aliases b; otherwise it is
// a copy. With ErrNeedMore it returns next, the length b must reach before
// the answer can change.
//
// A call walks the records that completed since the last call and looks at
// the partial one after them: a few nanoseconds per record.
func (w *tlsWalk) message(b []byte) (msg []byte, next int, err error) {
	for {
		if len(b)-w.off < tlsRecordHeaderLen {
			// A partial (or absent) record header. Check a later record's
			// type and version as far as they go, so that a non-handshake
			// record fails fast; the first's were checked by parse. The
			// type and version are checked byte by byte, the length once
			// the header is complete.
			if w.off > 0 && w.off < len(b) {
				if err := tlsRecordError(b[w.off:], w.off); err != nil {
					return nil, 0, err
				}
			}
			next := w.off + tlsRecordHeaderLen
			if len(b)-w.off < 2 {
				next = len(b) + 1
			}
			return nil, next, tlsNeedMore(w.off+tlsRecordHeaderLen, w.need, w.have)
		}
		rec := b[w.off : w.off+tlsRecordHeaderLen]
		n := int(rec[3])<<8 | int(rec[4])
		if rec[0] != tlsRecordTypeHandshake || rec[1] != tlsRecordVersionMajor || n == 0 || n > tlsMaxRecordLen {
			return nil, 0, tlsRecordError(rec, w.off)
		}
		start := w.off + tlsRecordHeaderLen
		end := start + n
		payload := b[start:min(end, len(b))] // the record, or what is in of it
		hdr, have, need := w.hdr, w.have+len(payload), w.need
		if need == 0 {
			// Rare: only until the 4-byte handshake header is in.
			for i := 0; i < len(payload) && w.have+i < tlsHandshakeHeaderLen; i++ {
				hdr[w.have+i] = payload[i]
			}
			if have > 0 && hdr[0] != tlsTypeClientHello {
				return nil, 0, tlsMalformed("handshake message type %d is not client_hello", hdr[0])
			}
			if have >= tlsHandshakeHeaderLen {
				l := int(hdr[1])<<16 | int(hdr[2])<<8 | int(hdr[3])
				if l > tlsMaxHandshakeLen {
					return nil, 0, tlsMalformed("client hello of %d bytes exceeds %d", l, tlsMaxHandshakeLen)
				}
				need = tlsHandshakeHeaderLen + l
			}
		}
		if need > 0 && have >= need {
			if w.records == 0 {
				// Fast path: the whole message is in the first record.
				return b[tlsRecordHeaderLen : tlsRecordHeaderLen+need], 0, nil
			}
			return tlsGather(b, need), 0, nil
		}
		if end > len(b) {
			// The record is cut short: its next byte is the next handshake
			// byte. Until the handshake header is in every byte counts;
			// then nothing changes until the message or the record ends.
			next := len(b) + 1
			if need > 0 {
				next = min(end, len(b)+need-have)
			}
			return nil, next, tlsNeedMore(len(b), need, have)
		}
		w.hdr, w.have, w.need, w.off = hdr, have, need, end
		w.records++
	}
}

// tlsRecordError returns the error for rec, a possibly partial record header
// at offset off that is not a handshake record of version 3.x and of 1 to
// 16384 bytes, or nil if the bytes present are fine.
func tlsRecordError(rec []byte, off int) error {
	if off > 0 && rec[0] != tlsRecordTypeHandshake {
		// crypto/tls drops a warning alert between handshake fragments; a
		// client has no reason to send one mid-hello, and may not in TLS 1.3
		// (RFC 8446, Section 5.1), so it is malformed here.
		return tlsMalformed("record type %d at offset %d before the client hello is complete", rec[0], off)
	}
	if off > 0 && len(rec) > 1 && rec[1] != tlsRecordVersionMajor {
		return tlsMalformed("record version %d.x at offset %d", rec[1], off)
	}
	if len(rec) < tlsRecordHeaderLen {
		return nil
	}
	switch n := int(rec[3])<<8 | int(rec[4]); {
	case n == 0:
		// crypto/tls rejects an empty handshake record (unexpected_message).
		return tlsMalformed("empty handshake record at offset %d", off)
	case n > tlsMaxRecordLen:
		return tlsMalformed("record of %d bytes at offset %d exceeds %d", n, off, tlsMaxRecordLen)
	}
	return nil
}

// tlsNeedMore returns ErrNeedMore, or ErrMalformed if the ClientHello cannot
// be complete within MaxTLSBytes. next is the earliest offset in b of the next
// handshake byte; need and have are as in tlsWalk.
func tlsNeedMore(next, need, have int) error {
	rest := tlsHandshakeHeaderLen - have // at least the rest of the header
	if need > 0 {
		rest = need - have
	}
	if next+rest > MaxTLSBytes {
		return tlsMalformed("client hello does not fit in %d bytes", MaxTLSBytes)
	}
	return errTLSNeedMore
}

// tlsGather copies the first need handshake bytes out of the records at the
// start of b, which tlsWalk.message has checked hold them.
func tlsGather(b []byte, need int) []byte {
	msg := make([]byte, need)
	for off, w := 0, 0; w < need; {
		n := int(b[off+3])<<8 | int(b[off+4])
		start := off + tlsRecordHeaderLen
		w += copy(msg[w:], b[start:min(start+n, len(b))])
		off = start + n
	}
	return msg
}

// parseClientHello parses msg, a complete client_hello handshake message
// (header included), following crypto/tls clientHelloMsg.unmarshal. On
// ErrMalformed only res.Protocol is set.
func parseClientHello(msg []byte, res Result) (Result, error) {
	s := cryptobyte.String(msg[tlsHandshakeHeaderLen:])
	var sessionID, suites, compression cryptobyte.String
	if !s.Skip(2 + 32) { // legacy_version, random
		return res, tlsMalformed("client hello shorter than version and random")
	}
	if !s.ReadUint8LengthPrefixed(&sessionID) || len(sessionID) > tlsMaxSessionIDLen {
		return res, tlsMalformed("bad session id")
	}
	if !s.ReadUint16LengthPrefixed(&suites) || len(suites)%2 != 0 {
		return res, tlsMalformed("bad cipher suites")
	}
	if !s.ReadUint8LengthPrefixed(&compression) {
		return res, tlsMalformed("bad compression methods")
	}
	if s.Empty() {
		// The extensions block is optional (RFC 5246); no extensions, no SNI.
		return res, errTLSNoName
	}
	var exts cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&exts) {
		return res, tlsMalformed("bad extensions length")
	}
	if !s.Empty() {
		return res, tlsMalformed("%d trailing bytes after extensions", len(s))
	}

	var (
		seen     tlsExtSet
		host     cryptobyte.String // the host_name, not yet validated
		haveHost bool
		alpn     cryptobyte.String // the ProtocolNameList, validated
		ech      bool
	)
	for !exts.Empty() {
		var (
			typ  uint16
			data cryptobyte.String
		)
		if !exts.ReadUint16(&typ) || !exts.ReadUint16LengthPrefixed(&data) {
			return res, tlsMalformed("bad extension framing")
		}
		if seen.add(typ) {
			return res, tlsMalformed("duplicate extension %d", typ)
		}
		switch typ {
		case tlsExtServerName:
			// RFC 6066, Section 3: entries of other name types are skipped;
			// two host_names are an error.
			var list cryptobyte.String
			if !data.ReadUint16LengthPrefixed(&list) || list.Empty() || !data.Empty() {
				return res, tlsMalformed("bad server_name extension")
			}
			for !list.Empty() {
				var (
					nameType uint8
					name     cryptobyte.String
				)
				if !list.ReadUint8(&nameType) || !list.ReadUint16LengthPrefixed(&name) || name.Empty() {
					return res, tlsMalformed("bad server_name entry")
				}
				if nameType != tlsNameTypeHostName {
					continue
				}
				if haveHost {
					return res, tlsMalformed("more than one host_name")
				}
				host, haveHost = name, true
			}
		case tlsExtALPN:
			// RFC 7301, Section 3.1: a non-empty list of non-empty names.
			if !data.ReadUint16LengthPrefixed(&alpn) || alpn.Empty() || !data.Empty() {
				return res, tlsMalformed("bad alpn extension")
			}
			for list := alpn; !list.Empty(); {
				var proto cryptobyte.String
				if !list.ReadUint8LengthPrefixed(&proto) || proto.Empty() {
					return res, tlsMalformed("bad alpn protocol name")
				}
			}
		case tlsExtEncryptedHello:
			// Presence is enough: the router reads the outer hello only.
			ech = true
		}
	}

	// Name and ALPN are built in one stack buffer and converted to a string
	// once: one allocation for both.
	var buf [tlsMaxNameLen + tlsMaxALPNLen]byte
	out := buf[:0]
	if haveHost {
		var ok bool
		if out, ok = tlsAppendHost(out, host); !ok {
			if len(host) > tlsMaxQuotedName {
				host = host[:tlsMaxQuotedName]
			}
			return res, tlsMalformed("invalid host_name %q", []byte(host))
		}
	}
	nameLen := len(out)
	out = tlsAppendALPN(out, alpn)
	if len(out) > 0 {
		all := string(out)
		res.Name, res.ALPN = all[:nameLen], all[nameLen:]
	}
	res.ECH = ech
	if !haveHost {
		return res, errTLSNoName
	}
	return res, nil
}

// tlsAppendHost appends the host name h to dst, lowercased and without one
// trailing dot, and reports whether h is a valid name (see ParseTLS).
func tlsAppendHost(dst, h []byte) ([]byte, bool) {
	if len(h) > 0 && h[len(h)-1] == '.' {
		h = h[:len(h)-1]
	}
	if len(h) == 0 || len(h) > tlsMaxNameLen {
		return dst, false
	}
	label := 0 // length of the current label
	for _, c := range h {
		switch {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '_':
			label++
		case 'A' <= c && c <= 'Z':
			c += 'a' - 'A'
			label++
		case c == '.':
			if label == 0 {
				return dst, false
			}
			label = 0
		default:
			return dst, false
		}
		if label > tlsMaxLabelLen {
			return dst, false
		}
		dst = append(dst, c)
	}
	return dst, label > 0
}

// tlsAppendALPN appends the protocols of list, a validated ProtocolNameList,
// to dst: joined by ',' and cut at a protocol boundary to tlsMaxALPNLen bytes
// (a first protocol longer than that is cut short). Bytes outside printable
// ASCII, and ',', become '?'.
func tlsAppendALPN(dst []byte, list cryptobyte.String) []byte {
	n := 0 // bytes appended
	for !list.Empty() {
		var proto cryptobyte.String
		list.ReadUint8LengthPrefixed(&proto) // validated by the caller
		if n > 0 {
			if n+1+len(proto) > tlsMaxALPNLen {
				break
			}
			dst = append(dst, ',')
			n++
		} else if len(proto) > tlsMaxALPNLen {
			proto = proto[:tlsMaxALPNLen]
		}
		for _, c := range proto {
			if c <= ' ' || c > '~' || c == ',' {
				c = '?'
			}
			dst = append(dst, c)
		}
		n += len(proto)
	}
	return dst
}

// tlsExtSet is a set of extension types, for the duplicate check. The zero
// value is empty. Types below 256 and the first 16 types above (GREASE,
// encrypted_client_hello, renegotiation_info, ...) cost no allocation; a
// ClientHello with more distinct high types spills into a map, as crypto/tls's
// own check uses.
type tlsExtSet struct {
	low   [256 / 64]uint64
	high  [16]uint16
	nHigh int
	spill map[uint16]struct{}
}

// add adds t to the set and reports whether it was already there.
func (s *tlsExtSet) add(t uint16) (dup bool) {
	if t < 256 {
		w, bit := t/64, uint64(1)<<(t%64)
		dup = s.low[w]&bit != 0
		s.low[w] |= bit
		return dup
	}
	for _, h := range s.high[:s.nHigh] {
		if h == t {
			return true
		}
	}
	if s.nHigh < len(s.high) {
		s.high[s.nHigh] = t
		s.nHigh++
		return false
	}
	if _, dup = s.spill[t]; dup {
		return true
	}
	if s.spill == nil {
		s.spill = make(map[uint16]struct{})
	}
	s.spill[t] = struct{}{}
	return false
}
