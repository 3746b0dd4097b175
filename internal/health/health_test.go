package health

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 12, 2, 8, 0, 0, 0, time.UTC)

// at returns t0 plus i seconds.
func at(i int) time.Time { return t0.Add(time.Duration(i) * time.Second) }

// step is one result in a sequence: "c+" a check success, "d-" a failed
// dial, and so on.
func step(s string, i int) Result {
	r := Result{OK: s[1] == '+', At: at(i)}
	switch s[0] {
	case 'c':
		r.Source = Check
	case 'd':
		r.Source = Dial
	}
	if !r.OK {
		r.Err = fmt.Sprintf("err%d", i)
	}
	return r
}

func TestStateMachine(t *testing.T) {
	for _, tc := range []struct {
		name string
		th   Thresholds
		seq  string // space-separated steps
		// want: after each step, "U" or "D", and "!" where it changed.
		want string
	}{
		{"stays up on successes", Thresholds{2, 3}, "c+ d+ c+", "U U U"},
		{"falls after fall failures", Thresholds{2, 3}, "c- c- c-", "U U D!"},
		{"dials and checks count together", Thresholds{2, 3}, "d- c- d-", "U U D!"},
		{"a success resets the run", Thresholds{2, 3}, "c- c- d+ c- c- c-", "U U U U U D!"},
		{"rises after rise successes", Thresholds{2, 3}, "c- c- c- c+ c+", "U U D! D U!"},
		{"a failure resets the rise", Thresholds{2, 3}, "c- c- c- d+ d- d+ c+", "U U D! D D D U!"},
		{"more failures while down change nothing", Thresholds{2, 3}, "c- c- c- c- c- c+ c+ c+", "U U D! D D D U! U"},
		{"rise and fall of 1", Thresholds{1, 1}, "d- d- c+ c+ d-", "D! D U! U D!"},
		{"thresholds below 1 count as 1", Thresholds{0, -1}, "c- c+", "D! U!"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var tab Table
			var got []string
			for i, s := range strings.Fields(tc.seq) {
				r := step(s, i)
				tr, changed := tab.Observe("b", r, tc.th)
				st, _ := tab.Get("b")
				g := "D"
				if st.Up {
					g = "U"
				}
				if changed {
					g += "!"
					if tr.Up != st.Up || tr.Key != "b" || tr.Source != r.Source || !tr.At.Equal(r.At) {
						t.Errorf("step %d: transition %+v for state %+v after %+v", i, tr, st, r)
					}
					want := max(tc.th.Fall, 1)
					if tr.Up {
						want = max(tc.th.Rise, 1)
					}
					if tr.Count != want {
						t.Errorf("step %d: transition count %d; want %d", i, tr.Count, want)
					}
					if !st.Since.Equal(r.At) {
						t.Errorf("step %d: since %v; want %v", i, st.Since, r.At)
					}
				} else if tr != (Transition{}) {
					t.Errorf("step %d: no change but transition %+v", i, tr)
				}
				if st.Successes != 0 && st.Failures != 0 {
					t.Errorf("step %d: both counters set: %+v", i, st)
				}
				got = append(got, g)
			}
			if g := strings.Join(got, " "); g != tc.want {
				t.Errorf("states %s; want %s", g, tc.want)
			}
		})
	}
}

func TestTransitionReason(t *testing.T) {
	var tab Table
	th := Thresholds{Rise: 2, Fall: 2}
	tab.Observe("b", Result{Source: Check, Err: "timeout", At: at(0)}, th)
	tr, ok := tab.Observe("b", Result{Source: Dial, Err: "connection refused", At: at(1)}, th)
	if want := "2 consecutive failures, the last a dial: connection refused"; !ok || tr.Reason() != want || tr.Err != "connection refused" {
		t.Errorf("down: %v %+v reason %q; want %q", ok, tr, tr.Reason(), want)
	}
	tab.Observe("b", Result{OK: true, Source: Dial, At: at(2)}, th)
	tr, ok = tab.Observe("b", Result{OK: true, Source: Check, At: at(3)}, th)
	if want := "2 consecutive successes, the last a check"; !ok || tr.Reason() != want {
		t.Errorf("up: %v reason %q; want %q", ok, tr.Reason(), want)
	}
	st, _ := tab.Get("b")
	if st.LastError != "connection refused" || !st.LastResult.Equal(at(3)) || !st.Since.Equal(at(3)) {
		t.Errorf("state %+v; want the last error kept, last result and since at %v", st, at(3))
	}
}

func TestUnknownIsUp(t *testing.T) {
	var tab Table
	if !tab.Up("never.seen:443") {
		t.Error("a backend the table has never seen is down")
	}
	if _, ok := tab.Get("never.seen:443"); ok {
		t.Error("Get found a backend never seen")
	}
	tab.Observe("a", Result{OK: true, Source: Check, At: at(5)}, Thresholds{1, 1})
	if st, ok := tab.Get("a"); !ok || !st.Up || !st.Since.Equal(at(5)) {
		t.Errorf("first seen: %+v, %v; want up since its first result", st, ok)
	}
}

func TestReconcile(t *testing.T) {
	var tab Table
	tab.Observe("keep", Result{Source: Check, Err: "x", At: at(1)}, Thresholds{1, 1})
	tab.Observe("drop", Result{Source: Check, Err: "x", At: at(1)}, Thresholds{1, 1})
	tab.Reconcile([]string{"keep", "new"}, at(9))
	if got := tab.Keys(); !slices.Equal(got, []string{"keep", "new"}) {
		t.Errorf("keys %v; want [keep new]", got)
	}
	if tab.Up("keep") {
		t.Error("a kept backend lost its down state")
	}
	if st, _ := tab.Get("new"); !st.Up || !st.Since.Equal(at(9)) {
		t.Errorf("new backend %+v; want up since %v", st, at(9))
	}
}

// sample returns a table with up and down backends and every field set.
func sample() *Table {
	var tab Table
	th := Thresholds{Rise: 2, Fall: 2}
	tab.Observe("10.0.0.1:443|tls|app.example.com", Result{OK: true, Source: Check, At: at(1)}, th)
	tab.Observe("10.0.0.2:443|tcp", Result{Source: Dial, Err: "dial tcp 10.0.0.2:443: connect: connection refused", At: at(2)}, th)
	tab.Observe("10.0.0.2:443|tcp", Result{Source: Check, Err: "i/o timeout", At: at(3)}, th)
	tab.Observe("10.0.0.2:443|tcp", Result{OK: true, Source: Check, At: at(4)}, th)
	tab.Observe("[::1]:8443|tcp", Result{Source: Dial, Err: "é", At: time.Unix(0, -5)}, th)
	tab.Reconcile(append(tab.Keys(), "new:1"), time.Time{})
	return &tab
}

func equalTables(a, b *Table) error {
	if !slices.Equal(a.Keys(), b.Keys()) {
		return fmt.Errorf("keys %v and %v", a.Keys(), b.Keys())
	}
	for _, k := range a.Keys() {
		x, _ := a.Get(k)
		y, _ := b.Get(k)
		if x.Up != y.Up || !x.Since.Equal(y.Since) || !x.LastResult.Equal(y.LastResult) ||
			x.Successes != y.Successes || x.Failures != y.Failures || x.LastError != y.LastError {
			return fmt.Errorf("%s: %+v and %+v", k, x, y)
		}
	}
	return nil
}

func TestRoundTrip(t *testing.T) {
	for _, tab := range []*Table{{}, sample()} {
		b, err := tab.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var got Table
		if err := got.UnmarshalBinary(b); err != nil {
			t.Fatalf("decode %x: %v", b, err)
		}
		if err := equalTables(tab, &got); err != nil {
			t.Errorf("round trip changed the table: %v", err)
		}
		b2, _ := got.AppendBinary([]byte("prefix"))
		if !bytes.Equal(b2[len("prefix"):], b) {
			t.Errorf("re-encoding differs:\n%x\n%x", b, b2)
		}
	}
	// Decoding replaces the contents.
	got := sample()
	if err := got.UnmarshalBinary([]byte{'H', 1, 0}); err != nil || got.Len() != 0 {
		t.Errorf("decode of an empty table: %v, %d entries left", err, got.Len())
	}
}

func TestEncodeBadKey(t *testing.T) {
	var tab Table
	tab.Observe(strings.Repeat("k", maxKeyLen+1), Result{OK: true, At: at(0)}, Thresholds{1, 1})
	if _, err := tab.MarshalBinary(); err == nil {
		t.Error("a key over the limit encoded")
	}
}

func TestDecodeErrors(t *testing.T) {
	good, _ := sample().MarshalBinary()
	entry := func(key string, flags byte, succ, fail byte) []byte {
		return append([]byte{byte(len(key))}, append([]byte(key), flags, 0, 0, succ, fail, 0)...)
	}
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"bad magic", []byte{'X', 1, 0}},
		{"bad version", []byte{'H', 2, 0}},
		{"truncated", good[:len(good)-1]},
		{"trailing", append(slices.Clone(good), 0)},
		{"count too big", []byte{'H', 1, 0xff, 0xff, 0x7f}},
		{"non-minimal varint", []byte{'H', 1, 0x80, 0x00}},
		{"varint overflow", []byte{'H', 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}},
		{"empty key", append([]byte{'H', 1, 1}, entry("", 1, 0, 0)...)},
		{"keys out of order", append(append([]byte{'H', 1, 2}, entry("b", 1, 0, 0)...), entry("a", 1, 0, 0)...)},
		{"duplicate key", append(append([]byte{'H', 1, 2}, entry("a", 1, 0, 0)...), entry("a", 1, 0, 0)...)},
		{"unknown flag", append([]byte{'H', 1, 1}, entry("a", 3, 0, 0)...)},
		{"both counters", append([]byte{'H', 1, 1}, entry("a", 1, 1, 1)...)},
		{"key longer than data", []byte{'H', 1, 1, 5, 'a'}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tab := sample()
			err := tab.UnmarshalBinary(tc.data)
			if !errors.Is(err, ErrFormat) {
				t.Errorf("decode %x: %v; want ErrFormat", tc.data, err)
			}
			if e := equalTables(tab, sample()); e != nil {
				t.Errorf("a failed decode changed the table: %v", e)
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	for _, tab := range []*Table{{}, sample()} {
		b, _ := tab.MarshalBinary()
		f.Add(b)
	}
	f.Add([]byte{'H', 1, 1, 1, 'a', 1, 2, 2, 0, 3, 1, 'x'})
	f.Fuzz(func(t *testing.T, data []byte) {
		var tab Table
		if err := tab.UnmarshalBinary(data); err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error %v does not wrap ErrFormat", err)
			}
			return
		}
		// The form is canonical: what decodes encodes back to itself.
		b, err := tab.MarshalBinary()
		if err != nil {
			t.Fatalf("decoded table does not encode: %v", err)
		}
		if !bytes.Equal(b, data) {
			t.Fatalf("decode then encode:\n%x\n%x", data, b)
		}
	})
}
