package ipc

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sniproxy/sniproxy/internal/dupfd"
)

const (
	// readBufSize is the size of a Conn's receive buffer: one recvmsg reads
	// at most this much. Bigger payloads are assembled from several reads.
	readBufSize = 64 << 10
	// keepWriteBuf is the largest send buffer a Conn keeps between Sends;
	// a bigger one (a config) is dropped after its frame is written.
	keepWriteBuf = 64 << 10
)

// oobSize fits MaxFiles descriptors plus credentials, should the socket
// ever get SO_PASSCRED.
var oobSize = unix.CmsgSpace(MaxFiles*4) + unix.CmsgSpace(unix.SizeofUcred)

// Conn is one end of a master–worker socketpair.
//
// Send is safe for concurrent use by any number of goroutines; each frame is
// written whole before another Send writes. Recv is meant for one reader
// goroutine (concurrent calls are serialized). Close may be called at any
// time, from any goroutine: it makes blocked Send and Recv calls return.
//
// The peer must keep reading: Send blocks while the peer's receive buffer is
// full. Run Recv in its own goroutine for as long as the Conn is open.
type Conn struct {
	uc *net.UnixConn
	rc syscall.RawConn

	wmu     sync.Mutex
	wbuf    []byte
	werr    error // sticky: set once a frame has been partly written
	wp      []byte
	woob    []byte
	wn      int
	wsysErr error
	writeFn func(fd uintptr) bool // built once so a Send allocates nothing for it

	rmu sync.Mutex
	r   reader

	closeOnce sync.Once
	closeErr  error
}

// reader is the receive state of a Conn, guarded by Conn.rmu.
type reader struct {
	buf  []byte // allocated on first use
	r, w int    // unread bytes are buf[r:w]
	base int64  // stream offset of buf[0]

	// batches are descriptors received and not yet handed out, in order.
	batches []batch

	// The frame being received, kept across a read deadline.
	inFrame  bool
	hdr      header
	frameEnd int64 // stream offset just past its payload
	payload  []byte
	files    []*os.File

	err error // sticky: the connection is unusable

	// recvmsg arguments and results for readFn.
	oob     []byte
	n, oobn int
	flags   int
	sysErr  error
	readFn  func(fd uintptr) bool
}

// batch is the descriptors one recvmsg returned, with the stream offsets of
// the bytes that recvmsg read. The kernel hands descriptors to the recvmsg
// that reads the first byte sent with them, and Send attaches them to the
// first byte of their frame, so the frame they belong to starts inside
// [start, end).
type batch struct {
	start, end int64
	files      []*os.File
}

// Pair returns a connected pair of stream sockets: the master's end as a
// Conn, and the worker's end as a file for exec.Cmd.ExtraFiles (the worker
// turns it into a Conn with FileConn).
//
// Both descriptors are close-on-exec, so no other child inherits either
// (exec.Cmd clears the flag on the copies it passes in ExtraFiles). The
// worker's file is in blocking mode, so os.StartProcess calling its Fd
// changes nothing. Close workerFile in the master once the worker has
// started: if the master kept it, the master would never see EOF when the
// worker dies.
func Pair() (master *Conn, workerFile *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("ipc: socketpair: %w", os.NewSyscallError("socketpair", err))
	}
	mf := os.NewFile(uintptr(fds[0]), "ipc-master")
	workerFile = os.NewFile(uintptr(fds[1]), "ipc-worker")
	master, err = FileConn(mf)
	mf.Close()
	if err != nil {
		workerFile.Close()
		return nil, nil, err
	}
	return master, workerFile, nil
}

// FileConn returns a Conn over f, a connected AF_UNIX SOCK_STREAM socket
// (in a worker, the end Pair made, inherited through ExtraFiles). Like
// net.FileConn it works on a close-on-exec duplicate: f stays open and the
// caller should close it.
func FileConn(f *os.File) (*Conn, error) {
	nc, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("ipc: file %q: %w", f.Name(), err)
	}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		nc.Close()
		return nil, fmt.Errorf("ipc: file %q is a %T, not a Unix socket", f.Name(), nc)
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		uc.Close()
		return nil, fmt.Errorf("ipc: file %q: %w", f.Name(), err)
	}
	var typ int
	var serr error
	if err := rc.Control(func(fd uintptr) {
		typ, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_TYPE)
	}); err != nil || serr != nil {
		uc.Close()
		return nil, fmt.Errorf("ipc: file %q: getsockopt SO_TYPE: %w", f.Name(), errors.Join(err, serr))
	}
	if typ != unix.SOCK_STREAM {
		uc.Close()
		return nil, fmt.Errorf("ipc: file %q: socket type %d, want SOCK_STREAM", f.Name(), typ)
	}
	c := &Conn{uc: uc, rc: rc}
	c.writeFn = c.sendmsg
	c.r.readFn = c.r.recvmsg
	return c, nil
}

// SetReadDeadline sets the deadline for Recv, as net.Conn does. A Recv that
// times out returns an error wrapping os.ErrDeadlineExceeded and keeps the
// part of a frame already received: the next Recv resumes it.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if err := c.uc.SetReadDeadline(t); err != nil {
		return fmt.Errorf("ipc: %w", err)
	}
	return nil
}

// SetWriteDeadline sets the deadline for Send, as net.Conn does. A Send that
// times out before writing any byte of its frame leaves the Conn usable;
// one that times out having written part of it makes every later Send fail.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	if err := c.uc.SetWriteDeadline(t); err != nil {
		return fmt.Errorf("ipc: %w", err)
	}
	return nil
}

// Close closes the connection and every descriptor received but not yet
// returned by Recv. It makes blocked Send and Recv calls return an error
// wrapping net.ErrClosed. Only the first call closes; later calls return the
// first one's result.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		if err := c.uc.Close(); err != nil {
			c.closeErr = fmt.Errorf("ipc: close: %w", err)
		}
		// A Recv blocked in the poller returns once uc is closed, so
		// this does not wait long.
		c.rmu.Lock()
		c.r.fail(fmt.Errorf("ipc: recv: %w", net.ErrClosed))
		c.rmu.Unlock()
	})
	return c.closeErr
}

// SendBody encodes b (see Encode) and sends it with files.
func (c *Conn) SendBody(b Body, files ...*os.File) error {
	m, err := Encode(b, files...)
	if err != nil {
		return err
	}
	return c.Send(m)
}

// Send writes m as one frame. Files are sent as duplicates made just for
// this frame; m.Files are neither kept nor closed.
func (c *Conn) Send(m Message) error {
	if err := m.check(); err != nil {
		return err
	}
	var oob []byte
	if len(m.Files) > 0 {
		fds, err := dupFiles(m.Files)
		if err != nil {
			return fmt.Errorf("ipc: send %v: %w", m.Type, err)
		}
		defer closeFds(fds)
		oob = unix.UnixRights(fds...)
	}

	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return c.werr
	}
	// One buffer, one sendmsg for the usual frame: header and payload
	// leave together and the descriptors ride on the header's first byte.
	buf := appendHeader(c.wbuf[:0], m.Type, len(m.Files), len(m.Payload))
	buf = append(buf, m.Payload...)
	written, err := c.write(buf, oob)
	if cap(buf) <= keepWriteBuf {
		c.wbuf = buf[:0]
	} else {
		c.wbuf = nil
	}
	if err != nil {
		err = fmt.Errorf("ipc: send %v: %w", m.Type, err)
		if written > 0 {
			// The peer has part of a frame: anything more would be
			// read as its remainder.
			c.werr = fmt.Errorf("ipc: send: connection unusable after a partly written frame: %w", err)
		}
		return err
	}
	return nil
}

// write writes all of p, oob with its first byte. It returns how many bytes
// were written. c.wmu is held.
func (c *Conn) write(p, oob []byte) (int, error) {
	done := 0
	for done < len(p) {
		c.wp, c.woob = p[done:], oob
		err := c.rc.Write(c.writeFn)
		c.wp, c.woob = nil, nil
		if err != nil {
			return done, err
		}
		if c.wsysErr != nil {
			return done, os.NewSyscallError("sendmsg", c.wsysErr)
		}
		if c.wn <= 0 {
			return done, io.ErrShortWrite
		}
		done += c.wn
		oob = nil // sent with the first byte
	}
	return done, nil
}

// sendmsg is the RawConn.Write callback: one sendmsg of c.wp and c.woob.
func (c *Conn) sendmsg(fd uintptr) bool {
	for {
		// MSG_NOSIGNAL: a vanished peer is an EPIPE error, never a signal.
		c.wn, c.wsysErr = unix.SendmsgN(int(fd), c.wp, c.woob, nil, unix.MSG_NOSIGNAL)
		if c.wsysErr != unix.EINTR {
			return c.wsysErr != unix.EAGAIN
		}
	}
}

// dupFiles returns close-on-exec duplicates of the descriptors of files,
// never through File.Fd (see dupfd).
func dupFiles(files []*os.File) ([]int, error) {
	fds := make([]int, 0, len(files))
	for i, f := range files {
		nfd, err := dupfd.Fd(f)
		if err != nil {
			closeFds(fds)
			return nil, fmt.Errorf("file %d (%s): %w", i, f.Name(), err)
		}
		fds = append(fds, nfd)
	}
	return fds, nil
}

func closeFds(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// Recv returns the next message. Errors:
//   - io.EOF: the peer closed the connection (or died) between frames.
//   - io.ErrUnexpectedEOF (wrapped): the peer closed it inside a frame.
//   - ErrBadFrame, ErrVersion, ErrTooLarge (wrapped): the peer sent
//     something else than frames of this protocol.
//   - net.ErrClosed (wrapped): Close was called.
//   - os.ErrDeadlineExceeded (wrapped): the read deadline passed; this one
//     alone leaves the Conn usable.
//
// After any other error the Conn is unusable: every later Recv returns the
// same error, and the descriptors that came with unreturned frames are
// closed. The caller closes the Conn.
//
// Recv grows a payload as its bytes arrive (doubling, from 64 KiB, never
// past the header's length): whatever length a header claims, a payload
// buffer is at most twice the bytes received, or 64 KiB.
func (c *Conn) Recv() (Message, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	r := &c.r
	if r.err != nil {
		return Message{}, r.err
	}
	if r.buf == nil {
		r.buf = make([]byte, readBufSize)
		r.oob = make([]byte, oobSize)
	}
	m, err := c.recv()
	if err != nil {
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			r.fail(err)
		}
		return Message{}, err
	}
	return m, nil
}

// recv reads one frame. c.rmu is held.
func (c *Conn) recv() (Message, error) {
	r := &c.r
	if !r.inFrame {
		for r.w-r.r < HeaderSize {
			if err := checkPrefix(r.buf[r.r:r.w]); err != nil {
				return Message{}, err
			}
			if err := c.fill(); err != nil {
				if err == io.EOF && r.w > r.r {
					return Message{}, fmt.Errorf("ipc: recv: peer closed after %d of %d header bytes: %w", r.w-r.r, HeaderSize, io.ErrUnexpectedEOF)
				}
				return Message{}, err
			}
		}
		h, err := parseHeader(r.buf[r.r : r.r+HeaderSize])
		if err != nil {
			return Message{}, err
		}
		files, err := r.claim(r.base+int64(r.r), h)
		if err != nil {
			return Message{}, err
		}
		r.r += HeaderSize
		r.inFrame, r.hdr, r.files = true, h, files
		r.frameEnd = r.base + int64(r.r) + int64(h.length)
		if err := r.stray(); err != nil {
			return Message{}, err
		}
		if h.length > 0 {
			r.payload = make([]byte, 0, min(h.length, readBufSize))
		}
	}
	for len(r.payload) < r.hdr.length {
		if r.r == r.w {
			if err := c.fill(); err != nil {
				if err == io.EOF {
					return Message{}, fmt.Errorf("ipc: recv: peer closed after %d of %d payload bytes of a %v frame: %w", len(r.payload), r.hdr.length, r.hdr.typ, io.ErrUnexpectedEOF)
				}
				return Message{}, err
			}
			continue
		}
		n := min(r.hdr.length-len(r.payload), r.w-r.r)
		if cap(r.payload)-len(r.payload) < n {
			// Grow by doubling, never past the frame's length.
			p := make([]byte, len(r.payload), min(r.hdr.length, max(2*cap(r.payload), len(r.payload)+n)))
			copy(p, r.payload)
			r.payload = p
		}
		r.payload = append(r.payload, r.buf[r.r:r.r+n]...)
		r.r += n
	}
	m := Message{Type: r.hdr.typ, Payload: r.payload, Files: r.files}
	r.inFrame, r.hdr, r.payload, r.files = false, header{}, nil, nil
	return m, nil
}

// claim returns the descriptors of the frame h starting at stream offset
// off, and checks that the peer sent none that no frame declared.
func (r *reader) claim(off int64, h header) ([]*os.File, error) {
	if len(r.batches) > 0 && r.batches[0].end <= off {
		// Descriptors came with bytes of earlier frames that declared
		// none (a well-behaved peer's would start inside this range).
		return nil, fmt.Errorf("ipc: recv: %d file descriptors came with no frame declaring them: %w", len(r.batches[0].files), ErrBadFrame)
	}
	if h.nfds == 0 {
		return nil, nil
	}
	if len(r.batches) == 0 || r.batches[0].start > off {
		return nil, fmt.Errorf("ipc: recv: %v frame declares %d file descriptors, none came with it: %w", h.typ, h.nfds, ErrBadFrame)
	}
	b := r.batches[0]
	if len(b.files) != h.nfds {
		return nil, fmt.Errorf("ipc: recv: %v frame declares %d file descriptors, %d came with it: %w", h.typ, h.nfds, len(b.files), ErrBadFrame)
	}
	r.batches[0] = batch{}
	r.batches = r.batches[1:]
	return b.files, nil
}

// stray reports descriptors that came with bytes of the current frame's
// payload alone: no frame starts there to own them. It refuses them as soon
// as they arrive, so a peer cannot pile up descriptors in a long payload.
func (r *reader) stray() error {
	if r.inFrame && len(r.batches) > 0 && r.batches[0].end <= r.frameEnd {
		return fmt.Errorf("ipc: recv: %d file descriptors came inside a %v frame that declares none: %w", len(r.batches[0].files), r.hdr.typ, ErrBadFrame)
	}
	return nil
}

// fill reads more bytes into the buffer; it returns io.EOF when the peer has
// closed. c.rmu is held.
func (c *Conn) fill() error {
	r := &c.r
	if r.r == r.w || len(r.buf)-r.w < HeaderSize {
		// Make room at the end; at most a header's worth is moved.
		n := copy(r.buf, r.buf[r.r:r.w])
		r.base += int64(r.r)
		r.r, r.w = 0, n
	}
	if err := c.rc.Read(r.readFn); err != nil {
		return fmt.Errorf("ipc: recv: %w", err)
	}
	if r.sysErr == unix.ECONNRESET {
		// The peer closed with data of ours unread (Linux reports it
		// once our queue is empty): it is gone, as at EOF.
		r.n, r.oobn, r.sysErr = 0, 0, nil
	}
	if r.sysErr != nil {
		return fmt.Errorf("ipc: recv: %w", os.NewSyscallError("recvmsg", r.sysErr))
	}
	if r.oobn > 0 {
		if files := parseRights(r.oob[:r.oobn]); len(files) > 0 {
			start := r.base + int64(r.w)
			b := batch{start: start, end: start + int64(r.n), files: files}
			r.batches = append(r.batches, b)
			if err := r.stray(); err != nil {
				return err
			}
		}
	}
	if r.flags&unix.MSG_CTRUNC != 0 {
		// Some or all of the descriptors sent were dropped (with none
		// installed, oobn is 0): the frame cannot be delivered whole.
		return fmt.Errorf("ipc: recv: file descriptors lost (MSG_CTRUNC: out of descriptors?): %w", ErrBadFrame)
	}
	if r.n == 0 {
		return io.EOF
	}
	r.w += r.n
	return nil
}

// recvmsg is the RawConn.Read callback: one recvmsg into the free part of
// the buffer.
func (r *reader) recvmsg(fd uintptr) bool {
	for {
		r.n, r.oobn, r.flags, _, r.sysErr = unix.Recvmsg(int(fd), r.buf[r.w:], r.oob, unix.MSG_CMSG_CLOEXEC)
		if r.sysErr != unix.EINTR {
			return r.sysErr != unix.EAGAIN
		}
	}
}

// parseRights returns the descriptors in SCM_RIGHTS control messages as
// files; other control messages are ignored.
func parseRights(oob []byte) []*os.File {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		// The kernel wrote oob; it is well-formed.
		return nil
	}
	var files []*os.File
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		fds, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "ipc-received"))
		}
	}
	return files
}

// fail makes err the sticky error and closes every descriptor not handed
// out. c.rmu is held.
func (r *reader) fail(err error) {
	if r.err == nil {
		r.err = err
	}
	for _, b := range r.batches {
		for _, f := range b.files {
			f.Close()
		}
	}
	r.batches = nil
	for _, f := range r.files {
		f.Close()
	}
	r.files, r.payload, r.inFrame = nil, nil, false
}
