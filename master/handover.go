package master

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"

	"github.com/cloudflare/tableflip"

	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/ipc"
)

// handoverName is the tableflip file name of the handover socket.
const handoverName = "handover"

// handoverMsg is one JSON line on the handover socket between a master
// (the parent, generation G) and its upgrade successor (G+1).
//
// Parent to successor: first a State (cumulative counters, generation),
// then a Delta for every stats push of the parent's draining workers (its
// Active is the change in the parent's live connections); EOF when the
// parent exits. Successor to parent: Ready with its PID and generation just
// before it signals readiness; Hurry when it must upgrade again while the
// parent still drains.
type handoverMsg struct {
	State *handoverState  `json:"state,omitempty"`
	Delta *stats.Snapshot `json:"delta,omitempty"`
	Ready *readyInfo      `json:"ready,omitempty"`
	// Reserve is the permits the parent's workers still hold: exact, from
	// its lease pool, so the successor never grants them twice.
	Reserve *int `json:"reserve,omitempty"`
	Hurry   bool `json:"hurry,omitempty"`
}

// handoverState is what survives an upgrade.
type handoverState struct {
	Generation    int            `json:"generation"`
	Totals        stats.Snapshot `json:"totals"`
	Restarts      uint64         `json:"restarts"`
	ReloadsOK     uint64         `json:"reloads_ok"`
	ReloadsFailed uint64         `json:"reloads_failed"`
	Reserve       int            `json:"reserve"`
}

// readyInfo names a new generation.
type readyInfo struct {
	PID        int `json:"pid"`
	Generation int `json:"generation"`
}

// handover is one end of the handover socket.
type handover struct {
	conn *net.UnixConn
	r    *bufio.Reader
	wmu  sync.Mutex
	enc  *json.Encoder
}

func newHandover(f *os.File) (*handover, error) {
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("master: handover socket: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("master: handover socket is a %T", c)
	}
	return &handover{conn: uc, r: bufio.NewReaderSize(uc, 64<<10), enc: json.NewEncoder(uc)}, nil
}

// send writes one message; safe for concurrent use.
func (h *handover) send(m handoverMsg) error {
	h.wmu.Lock()
	defer h.wmu.Unlock()
	if err := h.enc.Encode(m); err != nil {
		return fmt.Errorf("master: handover: %w", err)
	}
	return nil
}

// recv reads one message; a line over 1 MiB is an error.
func (h *handover) recv() (handoverMsg, error) {
	var m handoverMsg
	line, err := h.r.ReadSlice('\n')
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(line, &m); err != nil {
		return m, fmt.Errorf("master: handover: %w", err)
	}
	return m, nil
}

func (h *handover) close() { h.conn.Close() }

// newHandoverPair makes a socketpair, registers one end with the Upgrader
// for the successor and returns the other.
func newHandoverPair(upg *tableflip.Upgrader) (*handover, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("master: handover socketpair: %w", err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "handover"), os.NewFile(uintptr(fds[1]), "handover-successor")
	err = upg.AddFile(handoverName, theirs)
	theirs.Close()
	if err != nil {
		mine.Close()
		return nil, fmt.Errorf("master: handover: %w", err)
	}
	return newHandover(mine)
}

// migrateName is the tableflip file name of the migration socket: an
// ipc pair over which a parent hurried by its successor hands over its
// proxied connections (ipc.Connection frames, each with its two sockets).
// It is separate from the handover socket, a JSON stream that cannot carry
// descriptors.
const migrateName = "migrate"

// newMigratePair makes the migration pair, registers the successor's end
// with the Upgrader and returns this master's end.
func newMigratePair(upg *tableflip.Upgrader) (*ipc.Conn, error) {
	mine, theirs, err := ipc.Pair()
	if err != nil {
		return nil, fmt.Errorf("master: migration socket: %w", err)
	}
	err = upg.AddFile(migrateName, theirs)
	theirs.Close()
	if err != nil {
		mine.Close()
		return nil, fmt.Errorf("master: migration socket: %w", err)
	}
	return mine, nil
}
