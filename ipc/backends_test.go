package ipc

import (
	"errors"
	"testing"
)

// TestBackendMessagesRejects checks that DialReport and BackendStats
// payloads that are not exact encodings are ErrBadPayload.
func TestBackendMessagesRejects(t *testing.T) {
	tests := []struct {
		name string
		typ  Type
		p    string
	}{
		{"report: empty", TypeDialReport, ""},
		{"report: count over", TypeDialReport, "\x00\x01\x00\x01"},
		{"report: truncated", TypeDialReport, "\x00\x00\x00\x01\x00\x01k\x01\x00\x00"},
		{"report: empty key", TypeDialReport, "\x00\x00\x00\x01\x00\x00\x01\x00\x00\x00\x01\x00\x00"},
		{"report: ok byte 2", TypeDialReport, "\x00\x00\x00\x01\x00\x01k\x02\x00\x00\x00\x01\x00\x00"},
		{"report: count 0", TypeDialReport, "\x00\x00\x00\x01\x00\x01k\x00\x00\x00\x00\x00\x00\x00"},
		{"report: success with reason", TypeDialReport, "\x00\x00\x00\x01\x00\x01k\x01\x00\x00\x00\x01\x00\x01r"},
		{"report: no time", TypeDialReport, "\x00\x00\x00\x01\x00\x01k\x01\x00\x00\x00\x01\x00\x00"},
		{"report: trailing", TypeDialReport, "\x00\x00\x00\x01\x00\x01k\x01\x00\x00\x00\x01\x00\x00" + "\x00\x00\x00\x00\x00\x00\x00\x00" + "\x00"},
		{"stats: empty route", TypeBackendStats, "\x00\x00\x00\x01\x00\x00\x00\x01b" + "\x00\x00\x00\x00\x00\x00\x00\x01" + "\x00\x00\x00\x00\x00\x00\x00\x01"},
		{"stats: truncated", TypeBackendStats, "\x00\x00\x00\x01\x00\x01r\x00\x01b\x00\x00\x00"},
		{"stats: trailing", TypeBackendStats, "\x00\x00\x00\x00\x00"},
	}
	for _, tt := range tests {
		_, err := Decode(Message{Type: tt.typ, Payload: []byte(tt.p)})
		if !errors.Is(err, ErrBadPayload) {
			t.Errorf("%s: Decode error %v; want ErrBadPayload", tt.name, err)
		}
	}
	for _, b := range []Body{
		DialReport{Results: []DialResult{{Key: "k", Count: 0}}},
		DialReport{Results: []DialResult{{Key: "", Count: 1}}},
		DialReport{Results: []DialResult{{Key: "k", OK: true, Count: 1, Reason: "r"}}},
		BackendStats{Deltas: []BackendDelta{{Route: "r"}}},
	} {
		if _, err := Encode(b); !errors.Is(err, ErrBadPayload) {
			t.Errorf("Encode(%+v): error %v; want ErrBadPayload", b, err)
		}
	}
}
