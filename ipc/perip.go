package ipc

import (
	"encoding/binary"
	"fmt"
	"math"
	"net/netip"
	"time"
)

// PerIP asks the master for a lease of client Key's per-client limits
// (limits.per_ip_*): Conns client permits and Tokens rate tokens, each 0
// when the worker needs none; the master answers with a PerIPGrant. With
// Return set it gives Conns client permits and Tokens tokens back instead, and
// nothing is answered.
//
// Encoding: one flags byte (bit 0 Return, no other bit set), the key (one
// byte: its length, 4 or 16, then the address), then Conns and Tokens as
// uint32, each 0..MaxInt32.
type PerIP struct {
	Key           netip.Addr
	Conns, Tokens int
	Return        bool
}

// Type returns TypePerIP.
func (PerIP) Type() Type { return TypePerIP }

// AppendBinary implements encoding.BinaryAppender.
func (p PerIP) AppendBinary(b []byte) ([]byte, error) {
	var flags byte
	if p.Return {
		flags = 1
	}
	b, err := appendKey(append(b, flags), TypePerIP, p.Key)
	if err != nil {
		return nil, err
	}
	if b, err = appendCount(b, TypePerIP, p.Conns); err != nil {
		return nil, err
	}
	return appendCount(b, TypePerIP, p.Tokens)
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (p *PerIP) UnmarshalBinary(b []byte) error {
	if len(b) < 1 {
		return badLength(TypePerIP, len(b), 14)
	}
	if b[0]&^1 != 0 {
		return fmt.Errorf("ipc: decode %v: flags %#x: %w", TypePerIP, b[0], ErrBadPayload)
	}
	key, rest, err := readKey(TypePerIP, b[1:])
	if err != nil {
		return err
	}
	if len(rest) != 8 {
		return badLength(TypePerIP, len(b), len(b)-len(rest)+8)
	}
	conns, err := count(TypePerIP, rest[:4])
	if err != nil {
		return err
	}
	tokens, err := count(TypePerIP, rest[4:])
	if err != nil {
		return err
	}
	*p = PerIP{Key: key, Conns: conns, Tokens: tokens, Return: b[0] == 1}
	return nil
}

// PerIPGrant answers a PerIP request for Key: Conns client permits and Tokens
// tokens, both 0 when the client is over a limit; then Retry says how long
// the worker may refuse the client without asking again.
//
// Encoding: the key as in PerIP, then Conns and Tokens as uint32 (each
// 0..MaxInt32), then Retry in whole milliseconds as uint32.
type PerIPGrant struct {
	Key           netip.Addr
	Conns, Tokens int
	Retry         time.Duration
}

// Type returns TypePerIPGrant.
func (PerIPGrant) Type() Type { return TypePerIPGrant }

// AppendBinary implements encoding.BinaryAppender. Retry is truncated to
// milliseconds, at most MaxUint32 of them.
func (g PerIPGrant) AppendBinary(b []byte) ([]byte, error) {
	b, err := appendKey(b, TypePerIPGrant, g.Key)
	if err != nil {
		return nil, err
	}
	if b, err = appendCount(b, TypePerIPGrant, g.Conns); err != nil {
		return nil, err
	}
	if b, err = appendCount(b, TypePerIPGrant, g.Tokens); err != nil {
		return nil, err
	}
	if g.Retry < 0 {
		return nil, fmt.Errorf("ipc: encode %v: retry %v: %w", TypePerIPGrant, g.Retry, ErrBadPayload)
	}
	return binary.BigEndian.AppendUint32(b, uint32(min(g.Retry.Milliseconds(), math.MaxUint32))), nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler.
func (g *PerIPGrant) UnmarshalBinary(b []byte) error {
	key, rest, err := readKey(TypePerIPGrant, b)
	if err != nil {
		return err
	}
	if len(rest) != 12 {
		return badLength(TypePerIPGrant, len(b), len(b)-len(rest)+12)
	}
	conns, err := count(TypePerIPGrant, rest[:4])
	if err != nil {
		return err
	}
	tokens, err := count(TypePerIPGrant, rest[4:8])
	if err != nil {
		return err
	}
	retry := time.Duration(binary.BigEndian.Uint32(rest[8:])) * time.Millisecond
	*g = PerIPGrant{Key: key, Conns: conns, Tokens: tokens, Retry: retry}
	return nil
}

// appendKey appends a client key: its length (4 or 16), then its bytes.
func appendKey(b []byte, t Type, key netip.Addr) ([]byte, error) {
	if !key.IsValid() || key.Zone() != "" {
		return nil, fmt.Errorf("ipc: encode %v: client key %v: %w", t, key, ErrBadPayload)
	}
	s := key.AsSlice()
	return append(append(b, byte(len(s))), s...), nil
}

// readKey decodes a client key from the start of p and returns the rest.
func readKey(t Type, p []byte) (netip.Addr, []byte, error) {
	if len(p) < 1 || (p[0] != 4 && p[0] != 16) {
		return netip.Addr{}, nil, fmt.Errorf("ipc: decode %v: bad client key: %w", t, ErrBadPayload)
	}
	n := int(p[0])
	if len(p) < 1+n {
		return netip.Addr{}, nil, badLength(t, len(p), 1+n)
	}
	key, _ := netip.AddrFromSlice(p[1 : 1+n])
	return key, p[1+n:], nil
}
