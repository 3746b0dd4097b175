package sniff

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// MaxH2CBytes is the most bytes of an h2c (HTTP/2 with prior knowledge)
// connection start — the client preface, the frames before the first
// HEADERS frame, and that HEADERS frame with its CONTINUATION frames — that
// ParseH2C reads. A start whose first header block is not complete within
// this many bytes is ErrMalformed.
const MaxH2CBytes = 32 << 10

const (
	// h2cMaxFrameSize is the SETTINGS_MAX_FRAME_SIZE default: a client may
	// not send larger frames before the server raises it, and the server
	// has not spoken yet.
	h2cMaxFrameSize = 16384
	// h2cMaxHeaderList caps the decoded header list (RFC 9113
	// SETTINGS_MAX_HEADER_LIST_SIZE accounting). The Framer's default is
	// 16 MB.
	h2cMaxHeaderList = 16 << 10
	// h2cHeaderTable is the HPACK dynamic table size a client may assume
	// before it has seen the server's SETTINGS.
	h2cHeaderTable = 4096
	// h2cMaxFrames caps the frames up to the end of the first header block.
	// Real clients send 2 to 8 (SETTINGS, WINDOW_UPDATE, some PRIORITY,
	// HEADERS); the cap bounds the work a trickle of empty frames causes
	// when ParseH2C is called again after every read.
	h2cMaxFrames = 64
	// h2cFrameHeaderLen is the size of an HTTP/2 frame header.
	h2cFrameHeaderLen = 9
)

var (
	errH2CNeedMore = fmt.Errorf("sniff: h2c: incomplete connection start: %w", ErrNeedMore)
	errH2CNotH2C   = fmt.Errorf("sniff: h2c: no HTTP/2 client preface: %w", ErrNotProtocol)
	errH2CTooLarge = fmt.Errorf("sniff: h2c: no complete header block within %d bytes: %w", MaxH2CBytes, ErrMalformed)
	errH2CNoName   = fmt.Errorf("sniff: h2c: request names no host: %w", ErrNoName)
)

// h2cMalformed returns an ErrMalformed for a reason.
func h2cMalformed(format string, args ...any) error {
	return fmt.Errorf("sniff: h2c: "+format+": %w", append(args, ErrMalformed)...)
}

// ParseH2C parses b, the bytes a client has sent so far, as the start of an
// HTTP/2 connection with prior knowledge (RFC 9113 section 3.3) and returns
// the host its first request names. It does not retain or modify b and is
// safe for concurrent use.
//
// b must start with the client preface "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
// ParseH2C returns ErrNotProtocol on the first byte that differs, and
// ErrNeedMore for a proper prefix of it. Then come frames: a SETTINGS frame
// first, then any of SETTINGS, WINDOW_UPDATE, PRIORITY, PING,
// PRIORITY_UPDATE and unknown extension frames, then a HEADERS frame on an
// odd stream and the CONTINUATION frames of its header block. Frames are at
// most 16384 bytes, at most 64 of them, the decoded header list at most 16
// KiB, and everything within MaxH2CBytes, else ErrMalformed. Frame headers
// are checked as soon as they arrive (a wrong first frame is reported 9
// bytes after the preface), whole frames before the request are read by
// golang.org/x/net/http2's Framer as they complete, and the header block is
// read, with an HPACK decoder, once all of it is there. Anything the Framer
// rejects is ErrMalformed. ParseH2C walks the frame headers from the start
// on every call (at most 64); Read keeps an h2cState instead, which goes on
// where the last call stopped.
//
// The name is the :authority pseudo-header, else the host header field,
// normalised as ParseHTTP1 does. More than one host field, or a host field
// that names another host than :authority (RFC 9113 section 8.3.1), is
// ErrMalformed; neither is ErrNoName.
//
// Result.Class is "grpc-web" for a content-type starting with
// application/grpc-web, "grpc" for other application/grpc types, and
// "websocket" for an extended CONNECT (RFC 8441) with :protocol websocket.
//
// Result.Protocol is H2C once the whole preface has been read; otherwise
// it is Unknown. Result.Name is set only with a nil error.
func ParseH2C(b []byte) (Result, error) {
	var s h2cState
	return s.parse(b)
}

// h2cState is ParseH2C's progress through the growing bytes of one
// connection: each call of parse must get the bytes of the previous call
// and possibly more. It resumes the frame walk after the last complete
// frame and the Framer after the last frame it read, and knows the next
// length at which the answer can change, so that Read's work for a whole
// connection start is linear in its bytes. The zero value starts at the
// first byte.
type h2cState struct {
	scan h2cScanner
	read int // end of the frames (after the preface) the Framer has read
	// next is the length b must reach before parse can answer other than
	// ErrNeedMore.
	next int
}

// ready reports whether b, the bytes last parsed and possibly more, may
// change parse's answer.
func (s *h2cState) ready(b []byte) bool { return len(b) >= s.next }

// resume returns the offset in b from which the next parse reads bytes it
// has not walked before.
func (s *h2cState) resume() int { return len(http2.ClientPreface) + s.scan.p }

// parse is ParseH2C on b, resuming where the last call stopped.
func (s *h2cState) parse(b []byte) (Result, error) {
	const preface = http2.ClientPreface
	if n := min(len(b), len(preface)); string(b[:n]) != preface[:n] {
		return Result{}, errH2CNotH2C
	}
	if len(b) < len(preface) {
		s.next = len(b) + 1 // the preface is checked byte by byte
		return Result{}, errH2CNeedMore
	}
	res := Result{Protocol: H2C}
	w := b
	if len(w) > MaxH2CBytes {
		w = w[:MaxH2CBytes]
	}
	frames := w[len(preface):]
	n, done, next, err := s.scan.scan(frames)
	if err != nil {
		return res, err
	}
	if done || n > s.read {
		if res, err = h2cRead(res, frames[s.read:n], done); err != nil || done {
			return res, err
		}
		s.read = n
	}
	if len(b) >= MaxH2CBytes {
		return res, errH2CTooLarge
	}
	s.next = min(len(preface)+next, MaxH2CBytes)
	return res, errH2CNeedMore
}

// h2cRead reads frames, whole frames after the client preface, with the
// Framer. If done, they end with the first header block, and h2cRead
// returns the request's Result; else it returns a nil error when the frames
// are well formed. Frames before the first header block carry no state
// the Framer keeps, so they may be read in several calls.
func h2cRead(res Result, frames []byte, done bool) (Result, error) {
	fr := http2.NewFramer(nil, bytes.NewReader(frames))
	fr.SetMaxReadFrameSize(h2cMaxFrameSize)
	fr.ReadMetaHeaders = hpack.NewDecoder(h2cHeaderTable, nil)
	fr.MaxHeaderListSize = h2cMaxHeaderList
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			if err == io.EOF && !done {
				return res, nil
			}
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				// h2cScanner handed over whole frames, so the Framer should
				// not run out of bytes inside one; if it does, the two
				// disagree on framing and the bytes are not trustworthy.
				return res, h2cMalformed("reading frames: %w", err)
			}
			if d := fr.ErrorDetail(); d != nil {
				return res, h2cMalformed("reading frames: %w (%v)", err, d)
			}
			return res, h2cMalformed("reading frames: %w", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if err := f.ForeachSetting(http2.Setting.Valid); err != nil {
				return res, h2cMalformed("SETTINGS: %w", err)
			}
		case *http2.MetaHeadersFrame:
			return h2cRequest(res, f)
		}
		// h2cScanner let only harmless frame types through.
	}
}

// h2cScanner walks the frame headers after the client preface, checking
// what they alone show: sizes, the frame order, and that nothing but
// connection-level chatter comes before the request. It keeps its place
// after the last complete frame, so that a call with more bytes goes on
// from there. The zero value starts at the first frame.
type h2cScanner struct {
	p      int    // end of the complete frames walked
	frames int    // complete frames walked
	block  uint32 // stream of an open header block awaiting CONTINUATION
	n      int    // end of the whole frames before the first header block
}

// scan walks the frames in b, the bytes after the client preface, which
// extend those of the last call. It returns n, how many bytes of b are
// whole frames worth reading, and done, whether those end with the first
// header block. Until the block is complete, n stops before its HEADERS
// frame: the HPACK block is decoded once, when it is all there. Otherwise
// next is the length b must reach before the answer can change: the end of
// the partial frame header or frame.
func (s *h2cScanner) scan(b []byte) (n int, done bool, next int, err error) {
	for {
		if s.block == 0 {
			s.n = s.p
		}
		p := s.p
		if len(b)-p < h2cFrameHeaderLen {
			return s.n, false, p + h2cFrameHeaderLen, nil
		}
		length := int(b[p])<<16 | int(b[p+1])<<8 | int(b[p+2])
		typ := http2.FrameType(b[p+3])
		flags := http2.Flags(b[p+4])
		stream := binary.BigEndian.Uint32(b[p+5:]) & (1<<31 - 1)
		if s.frames == h2cMaxFrames {
			return 0, false, 0, h2cMalformed("more than %d frames before the end of the first header block", h2cMaxFrames)
		}
		if length > h2cMaxFrameSize {
			return 0, false, 0, h2cMalformed("%v frame of %d bytes: %w", typ, length, http2.ErrFrameTooLarge)
		}
		if s.frames == 0 && (typ != http2.FrameSettings || flags.Has(http2.FlagSettingsAck)) {
			// RFC 9113 section 3.4: the preface ends with a SETTINGS frame.
			return 0, false, 0, h2cMalformed("first frame is %v, want SETTINGS", typ)
		}
		switch {
		case s.block != 0:
			if typ != http2.FrameContinuation || stream != s.block {
				return 0, false, 0, h2cMalformed("%v frame on stream %d inside the header block of stream %d", typ, stream, s.block)
			}
		case typ == http2.FrameHeaders:
			if stream%2 == 0 {
				return 0, false, 0, h2cMalformed("HEADERS frame on stream %d, want an odd stream", stream)
			}
		case typ == http2.FrameContinuation:
			return 0, false, 0, h2cMalformed("CONTINUATION frame without HEADERS")
		case typ == http2.FrameData, typ == http2.FrameRSTStream, typ == http2.FramePushPromise, typ == http2.FrameGoAway:
			return 0, false, 0, h2cMalformed("%v frame before the first request", typ)
		}
		end := p + h2cFrameHeaderLen + length
		if len(b) < end {
			return s.n, false, end, nil
		}
		s.p = end
		s.frames++
		if typ == http2.FrameHeaders || typ == http2.FrameContinuation {
			if flags.Has(http2.FlagHeadersEndHeaders) {
				return end, true, 0, nil
			}
			s.block = stream
		}
	}
}

// h2cRequest returns the Result for the first request's header block.
func h2cRequest(res Result, mh *http2.MetaHeadersFrame) (Result, error) {
	if mh.Truncated {
		return res, h2cMalformed("header list exceeds %d bytes", h2cMaxHeaderList)
	}
	method := mh.PseudoValue("method")
	if method == "" {
		return res, h2cMalformed("HEADERS without :method")
	}
	var (
		hosts     int
		host      string
		ctype     string
		haveCtype bool
	)
	for _, hf := range mh.RegularFields() {
		switch hf.Name {
		case "host":
			hosts++
			host = hf.Value
		case "content-type":
			if !haveCtype {
				ctype, haveCtype = hf.Value, true
			}
		}
	}
	if hosts > 1 {
		return res, h2cMalformed("%d host header fields", hosts)
	}
	var err error
	if authority := mh.PseudoValue("authority"); authority != "" {
		if res.Name, err = httpHostName(authority); err != nil {
			return res, h2cMalformed(":authority: %w", err)
		}
		if hosts == 1 {
			// RFC 9113 section 8.3.1: a host that differs from
			// :authority is malformed; routing on one while the backend
			// serves the other would be a confused deputy.
			if name, err := httpHostName(host); err != nil || name != res.Name {
				res.Name = ""
				return res, h2cMalformed("host header field does not match :authority")
			}
		}
	} else if hosts == 1 && host != "" {
		if res.Name, err = httpHostName(host); err != nil {
			return res, h2cMalformed("host: %w", err)
		}
	}

	switch {
	case method == "CONNECT" && httpEqualFold(mh.PseudoValue("protocol"), "websocket"):
		res.Class = "websocket"
	case httpHasPrefixFold(ctype, "application/grpc-web"):
		res.Class = "grpc-web"
	case httpHasPrefixFold(ctype, "application/grpc"):
		res.Class = "grpc"
	}
	if res.Name == "" {
		return res, errH2CNoName
	}
	return res, nil
}
