// Package sniff recognises the protocol of a new client connection and the
// name it asks for, from the first bytes it sends: the TLS ClientHello
// server_name (SNI), the HTTP/1.x Host header, or the h2c (HTTP/2 prior
// knowledge) :authority pseudo-header.
//
// Every parser here reads untrusted bytes. Each is a pure function over the
// bytes received so far and returns one of three sentinels when it cannot
// decide: ErrNeedMore (the bytes are a valid prefix, read more), ErrNotProtocol
// (these bytes are not this protocol), ErrMalformed (this protocol, but
// broken). Parsers never consume anything: the caller replays every byte it
// read to the backend. Read, which calls them as bytes arrive, keeps each
// parser's progress (the exported functions start from scratch), so that
// the work for one connection is linear in its bytes.
package sniff

import (
	"errors"
)

// Sentinel errors returned by the parsers. Callers test them with errors.Is;
// parsers may wrap them with detail.
var (
	// ErrNeedMore means the bytes so far are a valid prefix and the parser
	// needs more of them to decide.
	ErrNeedMore = errors.New("sniff: need more data")
	// ErrNotProtocol means the bytes are not the protocol the parser reads.
	ErrNotProtocol = errors.New("sniff: not this protocol")
	// ErrMalformed means the bytes are the parser's protocol but malformed,
	// truncated or over a size limit.
	ErrMalformed = errors.New("sniff: malformed")
	// ErrNoName means the message was well formed but named no host.
	ErrNoName = errors.New("sniff: no name")
)

// Protocol is the protocol a connection was recognised as.
type Protocol uint8

// The protocols a connection can be recognised as. The zero value is Unknown.
const (
	Unknown Protocol = iota
	TLS
	HTTP
	H2C
)

// String returns the metric label of p: "tls", "http", "h2c" or "unknown".
func (p Protocol) String() string {
	switch p {
	case TLS:
		return "tls"
	case HTTP:
		return "http"
	case H2C:
		return "h2c"
	default:
		return "unknown"
	}
}

// Result is what a parser learnt from a connection's first bytes.
type Result struct {
	// Protocol is the recognised protocol.
	Protocol Protocol
	// Name is the host name the client asked for: lowercased, without port
	// and without a trailing dot. It is empty only together with ErrNoName.
	Name string
	// ALPN is the client's offered ALPN protocol list joined by ",",
	// possibly truncated; TLS only, for logs.
	ALPN string
	// ECH reports that the TLS client offered encrypted_client_hello; Name
	// is then the outer (public) name.
	ECH bool
	// Class labels recognised application traffic for logs: "websocket",
	// "socketio", "soap", "jsonrpc", "grpc-web", "grpc", or "".
	Class string
}
