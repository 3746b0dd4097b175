package ipc

import (
	"errors"
	"os"
	"testing"
)

func TestLogFilesOverConn(t *testing.T) {
	a, b := pair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	for _, body := range []LogFiles{{Main: true}, {Access: true}, {Main: true, Access: true}, {}} {
		files := make([]*os.File, body.count())
		for i := range files {
			files[i] = w
		}
		m, err := Encode(body, files...)
		if err != nil {
			t.Fatalf("Encode(%+v): %v", body, err)
		}
		if err := a.Send(m); err != nil {
			t.Fatal(err)
		}
		got, err := b.Recv()
		if err != nil {
			t.Fatal(err)
		}
		dec, err := Decode(got)
		if err != nil {
			t.Fatalf("Decode: %v", err)
		}
		if dec != body || len(got.Files) != body.count() {
			t.Errorf("got %+v with %d files; want %+v with %d", dec, len(got.Files), body, body.count())
		}
		got.CloseFiles()
	}
	if _, err := Encode(LogFiles{Main: true}); !errors.Is(err, ErrBadPayload) {
		t.Errorf("Encode without the file = %v; want ErrBadPayload", err)
	}
	var l LogFiles
	if err := l.UnmarshalBinary([]byte{4}); !errors.Is(err, ErrBadPayload) {
		t.Errorf("unknown flag: %v; want ErrBadPayload", err)
	}
}
