package route

import (
	"net/netip"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// FuzzParseAnswer feeds parseAnswer any reply to a query for x.test. (A
// when qtype is even, AAAA when odd); the ID is taken from the reply so that
// the fuzzer reaches past the ID check. The seed corpus in
// testdata/fuzz/FuzzParseAnswer holds replies a name server sends: answers
// with CNAME chains, NXDOMAIN and NODATA with an SOA, truncated, SERVFAIL.
//
// Oracle: parseAnswer never panics; whatever it accepts has only addresses
// of the type asked for, at most maxAnswerAddrs, each carried by an answer
// record of that type as a complete parse of the message reads it; a
// negative TTL only comes with no address and never exceeds the SOA's
// 32-bit fields.
func FuzzParseAnswer(f *testing.F) {
	f.Add([]byte{}, byte(0))
	f.Fuzz(func(t *testing.T, msg []byte, qtype byte) {
		q := dnsmessage.Question{Name: dnsmessage.MustNewName("x.test."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}
		if qtype%2 == 1 {
			q.Type = dnsmessage.TypeAAAA
		}
		var id uint16
		if len(msg) >= 2 {
			id = uint16(msg[0])<<8 | uint16(msg[1])
		}
		ans, err := parseAnswer(msg, id, q)
		if err != nil || ans.truncated {
			if len(ans.addrs) != 0 {
				t.Fatalf("error %v or truncated, with addresses %v", err, ans.addrs)
			}
			return
		}
		if len(ans.addrs) > maxAnswerAddrs {
			t.Fatalf("%d addresses; want at most %d", len(ans.addrs), maxAnswerAddrs)
		}
		if len(ans.addrs) > 0 && ans.negTTL != -1 {
			t.Fatalf("addresses %v with a negative TTL %d", ans.addrs, ans.negTTL)
		}
		if ans.negTTL < -1 || ans.negTTL > 1<<32-1 {
			t.Fatalf("negative TTL %d out of range", ans.negTTL)
		}
		var m dnsmessage.Message
		unpacked := m.Unpack(msg) == nil
		for _, a := range ans.addrs {
			if a.Is4() != (q.Type == dnsmessage.TypeA) {
				t.Fatalf("address %s for a %v question", a, q.Type)
			}
			if unpacked && !answered(m, q.Type, a) {
				t.Fatalf("address %s in no %v answer record of %+v", a, q.Type, m.Answers)
			}
		}
	})
}

// answered reports whether an answer record of m of type typ carries a.
func answered(m dnsmessage.Message, typ dnsmessage.Type, a netip.Addr) bool {
	for _, r := range m.Answers {
		switch b := r.Body.(type) {
		case *dnsmessage.AResource:
			if typ == dnsmessage.TypeA && netip.AddrFrom4(b.A) == a {
				return true
			}
		case *dnsmessage.AAAAResource:
			if typ == dnsmessage.TypeAAAA && netip.AddrFrom16(b.AAAA) == a {
				return true
			}
		}
	}
	return false
}
