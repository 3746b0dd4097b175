package master

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/internal/perip"
	"github.com/sniproxy/sniproxy/internal/stats"
	"github.com/sniproxy/sniproxy/internal/status"
	"github.com/sniproxy/sniproxy/ipc"
)

// stateSocketName is the tableflip file name of the state socket. The
// name is on the wire between two masters of different builds: it stays
// "handover", the word used before the glossary.
const stateSocketName = "handover"

// stateMsg is one JSON line on the state socket between a master (the
// predecessor, generation G) and its successor (G+1).
//
// Predecessor to successor: first the proxy's listening sockets (Sockets,
// the descriptors attached by SCM_RIGHTS, in as many messages as
// maxFDsPerMsg needs), then a State (the succession state), then a
// Delta for every stats push of the predecessor's draining workers (its
// Active is the change in the predecessor's live connections) and a
// Reserve whenever its permits held change (with Moved, and PerIP and
// PerIPMoved for the per-client counts); EOF when the predecessor
// exits. Successor to predecessor: Ready with its PID and generation just
// before it signals readiness; Hurry when it must reload again while the
// predecessor still drains.
type stateMsg struct {
	// Sockets names the listening sockets whose descriptors come with
	// this message, in order (see sendSockets).
	Sockets []string         `json:"sockets,omitempty"`
	State   *successionState `json:"state,omitempty"`
	Delta   *stats.Snapshot  `json:"delta,omitempty"`
	Ready   *readyInfo       `json:"ready,omitempty"`
	// Reserve is the permits the predecessor's workers still hold: exact,
	// from its lease pool, so the successor never grants them twice.
	Reserve *int `json:"reserve,omitempty"`
	// Moved, sent with Reserve, counts the connections the predecessor
	// has moved to the successor so far: those not yet arrived still
	// count (see broker.setPredecessor).
	Moved *int `json:"moved,omitempty"`
	Hurry bool `json:"hurry,omitempty"`
	// Backends are connections the predecessor's draining workers made
	// to pool backends since the State (deltas).
	Backends []backendCount `json:"backends,omitempty"`
	// PerIP, predecessor to successor, is the client permits its workers now hold
	// of every client key whose count changed (see perIP).
	PerIP map[netip.Addr]int `json:"per_ip,omitempty"`
	// PerIPMoved, predecessor to successor, counts per client key the
	// connections it has moved to the successor so far, for the keys
	// whose count changed: those not yet arrived still count against
	// their client (see perIP). Sent before the lower PerIP count.
	PerIPMoved map[netip.Addr]int `json:"per_ip_moved,omitempty"`
}

// successionState is what a successor inherits besides the sockets.
type successionState struct {
	Generation    int            `json:"generation"`
	Totals        stats.Snapshot `json:"totals"`
	Restarts      uint64         `json:"restarts"`
	ReloadsOK     uint64         `json:"reloads_ok"`
	ReloadsFailed uint64         `json:"reloads_failed"`
	Reserve       int            `json:"reserve"`
	// History, Reloads and ReloadBegan carry the status page's history
	// (fields a predecessor of an older build leaves out).
	History     []status.Sample `json:"history,omitempty"`
	Reloads     []status.Reload `json:"reloads,omitempty"`
	ReloadBegan time.Time       `json:"reload_began,omitzero"`
	// Health is the backends' health table (health.Table's binary form),
	// HealthChanges how often each backend's state changed (by health
	// key), BackendCounts the connections made to each pool backend: a
	// successor starts from them rather than from "all up" and zero.
	Health        []byte            `json:"health,omitempty"`
	HealthChanges map[string]uint64 `json:"health_changes,omitempty"`
	BackendCounts []backendCount    `json:"backend_counts,omitempty"`
	// PerIP is the per-client table's state: the client permits held per client
	// key (reserves for the successor) and the buckets not full.
	PerIP *perip.State `json:"per_ip,omitempty"`
}

// readyInfo names a new generation.
type readyInfo struct {
	PID        int `json:"pid"`
	Generation int `json:"generation"`
}

// stateSocket is one end of the state socket. send is safe for concurrent
// use (wmu); recv is for one reader.
type stateSocket struct {
	conn *net.UnixConn
	r    *bufio.Reader
	in   *rightsReader
	wmu  sync.Mutex
	enc  *json.Encoder
}

// maxFDsPerMsg bounds the descriptors sent with one message: the kernel
// takes at most SCM_MAX_FD (253) in one sendmsg.
const maxFDsPerMsg = 250

// rightsReader reads a Unix stream socket with recvmsg and keeps the
// descriptors that come with the bytes (SCM_RIGHTS), in order, as plain
// numbers: none is put in the runtime's epoll. The kernel hands them over
// with the first byte of the sendmsg that carried them, so they are here
// by the time the message they came with is parsed.
type rightsReader struct {
	conn *net.UnixConn
	oob  []byte
	mu   sync.Mutex // guards fds and closed (recv's goroutine, and close)
	fds  []rawFD
	// closed is set by close: what a Read still under way receives
	// then is closed at once.
	closed bool
}

// Read implements io.Reader.
func (r *rightsReader) Read(p []byte) (int, error) {
	n, oobn, flags, _, err := r.conn.ReadMsgUnix(p, r.oob)
	n = max(n, 0) // -1 with some errors (a deadline)
	oobn = max(oobn, 0)
	if oobn > 0 {
		if perr := r.keep(r.oob[:oobn]); perr != nil && err == nil {
			err = perr
		}
	}
	if err == nil && flags&unix.MSG_CTRUNC != 0 {
		// Descriptors were lost (this process has too many open?):
		// the names that come with them would not match.
		err = errors.New("master: state socket: descriptors truncated (MSG_CTRUNC)")
	}
	if err == nil && n == 0 && len(p) > 0 {
		err = io.EOF
	}
	return n, err
}

// keep parses the control messages in oob and queues their descriptors.
func (r *rightsReader) keep(oob []byte) error {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return fmt.Errorf("master: state socket: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue // not SCM_RIGHTS
		}
		for _, fd := range fds {
			if r.closed {
				unix.Close(fd)
				continue
			}
			r.fds = append(r.fds, rawFD(fd))
		}
	}
	return nil
}

// take removes the first n descriptors received and returns them.
func (r *rightsReader) take(n int) ([]rawFD, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.fds) < n {
		return nil, fmt.Errorf("master: state socket: %d descriptors received; want %d", len(r.fds), n)
	}
	out := r.fds[:n:n]
	r.fds = r.fds[n:]
	return out, nil
}

// close closes the descriptors received and not taken.
func (r *rightsReader) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	closeFDs(r.fds)
	r.fds = nil
	r.closed = true
}

// newStateSocket wraps f, which it takes ownership of.
func newStateSocket(f *os.File) (*stateSocket, error) {
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("master: state socket: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("master: state socket is a %T", c)
	}
	in := &rightsReader{conn: uc, oob: make([]byte, unix.CmsgSpace(4*maxFDsPerMsg))}
	return &stateSocket{conn: uc, r: bufio.NewReaderSize(in, 64<<10), in: in, enc: json.NewEncoder(uc)}, nil
}

// send writes one message; safe for concurrent use.
func (s *stateSocket) send(m stateMsg) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := s.enc.Encode(m); err != nil {
		return fmt.Errorf("master: state socket: %w", err)
	}
	return nil
}

// sendSockets sends the listening sockets: names[i] is fds[i]'s name.
// The descriptors go by SCM_RIGHTS with the bytes of a Sockets message
// (several for more than maxFDsPerMsg); they stay the caller's.
func (s *stateSocket) sendSockets(names []string, fds []rawFD) error {
	if len(names) != len(fds) {
		return fmt.Errorf("master: state socket: %d socket names for %d descriptors", len(names), len(fds))
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	for len(names) > 0 {
		k := min(len(names), maxFDsPerMsg)
		line, err := json.Marshal(stateMsg{Sockets: names[:k]})
		if err != nil {
			return fmt.Errorf("master: state socket: %w", err)
		}
		line = append(line, '\n')
		ints := make([]int, k)
		for i, fd := range fds[:k] {
			ints[i] = int(fd)
		}
		n, _, err := s.conn.WriteMsgUnix(line, unix.UnixRights(ints...), nil)
		if err == nil && n < len(line) {
			// A stream socket may take part of the bytes; the
			// descriptors went with the first of them.
			_, err = s.conn.Write(line[n:])
		}
		if err != nil {
			return fmt.Errorf("master: state socket: sending sockets: %w", err)
		}
		names, fds = names[k:], fds[k:]
	}
	return nil
}

// recvSockets reads the listening sockets a predecessor sends before its
// succession state, and returns them by name with the message that
// follows them (normally the State). A predecessor of an older build
// sends none: the map is empty then.
func (s *stateSocket) recvSockets() (map[string]rawFD, stateMsg, error) {
	socks := map[string]rawFD{}
	for {
		msg, err := s.recv()
		if err != nil || msg.Sockets == nil {
			if err != nil {
				closeAll(socks)
				socks = nil
			}
			return socks, msg, err
		}
		fds, err := s.in.take(len(msg.Sockets))
		if err != nil {
			closeAll(socks)
			return nil, msg, err
		}
		for i, name := range msg.Sockets {
			if old, ok := socks[name]; ok {
				old.Close()
			}
			socks[name] = fds[i]
		}
	}
}

// closeAll closes every descriptor of socks.
func closeAll(socks map[string]rawFD) {
	for _, fd := range socks {
		fd.Close()
	}
}

// maxStateLine bounds one message on the state socket. The succession
// state carries the per-client table (up to its size in keys, some 40
// bytes each in JSON).
const maxStateLine = 64 << 20

// recv reads one message; a line over maxStateLine is an error.
func (s *stateSocket) recv() (stateMsg, error) {
	var m stateMsg
	line, err := s.r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		// A long line (the succession state): read on, within the bound.
		long := bytes.Clone(line)
		for errors.Is(err, bufio.ErrBufferFull) && len(long) <= maxStateLine {
			line, err = s.r.ReadSlice('\n')
			long = append(long, line...)
		}
		if err == nil && len(long) > maxStateLine {
			err = fmt.Errorf("master: state socket: a message over %d bytes", maxStateLine)
		}
		line = long
	}
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(line, &m); err != nil {
		return m, fmt.Errorf("master: state socket: %w", err)
	}
	return m, nil
}

// close closes the socket and the descriptors received on it and not
// taken.
func (s *stateSocket) close() {
	s.conn.Close()
	s.in.close()
}

// fileAdder registers a file for the successor (tableflip's AddFile).
type fileAdder interface {
	AddFile(name string, f *os.File) error
}

// newStateSocketPair makes a socketpair, registers one end with upg for
// the successor and returns the other.
func newStateSocketPair(upg fileAdder) (*stateSocket, error) {
	mine, theirs, err := socketPair("state")
	if err != nil {
		return nil, err
	}
	err = upg.AddFile(stateSocketName, theirs)
	theirs.Close()
	if err != nil {
		mine.Close()
		return nil, fmt.Errorf("master: state socket: %w", err)
	}
	return newStateSocket(mine)
}

// socketPair returns the two ends of a stream socketpair as files.
func socketPair(name string) (*os.File, *os.File, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("master: %s socketpair: %w", name, err)
	}
	return os.NewFile(uintptr(fds[0]), name), os.NewFile(uintptr(fds[1]), name+"-successor"), nil
}

// moveSocketName is the tableflip file name of the move socket: an ipc
// pair over which a predecessor hurried by its successor moves its proxied
// connections (ipc.Connection frames, each with its two sockets). It is
// separate from the state socket, a JSON stream that cannot carry
// descriptors. The name is on the wire between masters of different
// builds: it stays "migrate".
const moveSocketName = "migrate"

// newMoveSocketPair makes the move socket, registers the successor's end
// with upg and returns this master's end.
func newMoveSocketPair(upg fileAdder) (*ipc.Conn, error) {
	mine, theirs, err := ipc.Pair()
	if err != nil {
		return nil, fmt.Errorf("master: move socket: %w", err)
	}
	err = upg.AddFile(moveSocketName, theirs)
	theirs.Close()
	if err != nil {
		mine.Close()
		return nil, fmt.Errorf("master: move socket: %w", err)
	}
	return mine, nil
}
