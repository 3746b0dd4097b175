// Package ipc is the protocol between a sniproxy master and each of its
// worker processes: small, versioned, length-prefixed frames over a Unix
// socketpair, one pair per worker.
//
// Over a pair flow the worker's Hello and Ready, the master's validated
// Config (a worker never reads the config file), connection-permit leases
// (LeaseRequest, LeaseGrant, LeaseReturn, and Revoke when a sibling needs
// the spares), counter deltas (Stats, about once
// a second and a final flush), Retire and Stop, Ping and Pong, listening
// sockets (Listeners, with their descriptors), and the pool backends'
// shared health: the master's table (Health, right after the Config and on
// every change), the worker's dial outcomes (DialReport) and per-backend
// connection deltas (BackendStats). During a reload that must
// retire a draining generation early (a hurry), Move asks its workers to hand their
// proxied connections back as Connection frames (client and backend
// sockets and an opaque state); the old master passes them to the new one
// over a pair of the same protocol, and the new master to one of its
// workers, which goes on serving them.
//
// # Setting up
//
// The master makes a pair per worker and passes the worker's end as an
// inherited descriptor:
//
//	conn, wf, err := ipc.Pair()
//	cmd := exec.Command("/proc/self/exe", "worker") // the master's own binary
//	cmd.ExtraFiles = []*os.File{wf}                 // fd 3 in the worker
//	err = cmd.Start()
//	wf.Close() // else the master never sees EOF when the worker dies
//
// and the worker picks it up with
//
//	f := os.NewFile(3, "ipc")
//	conn, err := ipc.FileConn(f)
//	f.Close()
//
// The pair is also the worker's lifeline: when the master dies, even by
// SIGKILL, the kernel closes its end and the worker's Recv returns io.EOF;
// the worker then drains and exits. Both ends are close-on-exec, so no other
// child (another worker, a tableflip successor) holds a copy that would
// keep the pair open.
//
// # Why SOCK_STREAM
//
// A SOCK_SEQPACKET pair would keep message boundaries for free, but a
// message must then fit the socket send buffer in one piece (net.core.
// wmem_default, 208 KiB here, raised past net.core.wmem_max only with
// CAP_NET_ADMIN) and the reader must size its buffer for the largest one.
// A config with thousands of routes is several hundred KB. A stream socket
// takes frames of any size a few KB at a time, and framing costs one 12-byte
// header. Descriptors still arrive with the right frame (see below).
//
// # Frame format
//
// Every frame is a 12-byte header and a payload; integers are big-endian.
//
//	 0       1       2       3       4       5       6       7
//	+-------+-------+-------+-------+-------+-------+-------+-------+
//	|  'S'  |  'N'  |  'I'  |  'P'  |version| type  | nfds  |   0   |
//	+-------+-------+-------+-------+-------+-------+-------+-------+
//	|        payload length         |  payload (length bytes) ...
//	+-------+-------+-------+-------+-------------------------------
//	 8       9       10      11      12
//
//	bytes 0-3   magic "SNIP" (0x53 0x4e 0x49 0x50)
//	byte  4     protocol version: Version (4)
//	byte  5     message type: TypeHello (1) ... TypeBackendStats (19),
//	            TypeLogFiles (20), TypePerIP (21), TypePerIPGrant (22)
//	byte  6     number of file descriptors sent with the frame, 0..253;
//	            non-zero only for TypeListeners, TypeConnection (2) and
//	            TypeLogFiles (1 or 2)
//	byte  7     reserved, 0
//	bytes 8-11  payload length, uint32, at most MaxPayload (64 MiB)
//
// The receiver checks, in this order: magic (ErrBadFrame, refused after the
// first wrong byte, without waiting for the rest of the header), version
// (ErrVersion), type (ErrBadFrame), reserved byte (ErrBadFrame), length
// (ErrTooLarge), descriptor count (ErrTooLarge, or ErrBadFrame on a type
// that carries none). A length over the cap is refused from the header
// alone: nothing of the payload is read or allocated. Below the cap the
// payload buffer grows as bytes arrive, so a peer that claims 64 MiB and
// sends 3 bytes costs 64 KiB. Any of these errors leaves the stream out of
// sync: the connection is unusable.
//
// Payloads are fixed-size binary for everything on a hot or periodic path
// (leases, stats, ping), and binary for the rest too; each type's doc
// comment gives its layout. Decoding is exact: a payload of the wrong
// length or with trailing bytes is ErrBadPayload. The Config payload is the
// config's YAML, opaque to this package.
//
// # Versioning
//
// Version changes with any change a peer could misread: a new message type,
// a payload layout (including stats.Snapshot's fields), the header. There
// are no minor versions and no negotiation: every frame carries Version and
// a frame with another one is refused with ErrVersion naming both, and the
// Hello repeats it (Hello.Proto) so the master can log the refusal for that
// worker. Refusal is the only policy needed because a master and its
// workers are always the same binary: during a binary upgrade the new
// binary runs as a new master generation (a tableflip successor) with its
// own new workers. The one place two generations talk over this protocol
// is the pair that moves connections between masters (Connection frames):
// across an upgrade that changes Version, the new master refuses them and
// the old generation closes those connections instead of moving them.
// To keep that true, a master must start its workers from its own
// executable (/proc/self/exe), not from the path on disk, which a package
// upgrade may have replaced. A version mismatch therefore means a bug or a
// stray process, and the master should kill that worker.
//
// # File descriptors
//
// Only TypeListeners frames carry descriptors, one per name, in order
// (MaxFiles at most; send more in several frames), TypeConnection
// frames, exactly two, and TypeLogFiles frames, one per log file they
// name (the master opens log files and hands them to its workers, at
// start and on SIGUSR1, so that a worker never opens a path itself). Send attaches them with
// SCM_RIGHTS to the first byte of the frame's header. The kernel delivers
// them to the recvmsg that reads that byte, and never delivers two frames'
// descriptors in one recvmsg, so Recv can tell which frame they belong to;
// descriptors the peer sent with no frame declaring them, or fewer or more
// than a frame declares, are ErrBadFrame. MSG_CTRUNC (the receiver ran out
// of descriptors) is ErrBadFrame too.
//
// Received descriptors are close-on-exec (recvmsg with MSG_CMSG_CLOEXEC),
// so a worker that execs a helper does not leak listening sockets into it.
//
// Who closes what:
//   - Send sends duplicates and never closes Message.Files; the sender
//     keeps and closes its own.
//   - Recv hands the received files to the caller in Message.Files; the
//     caller owns them and must close each, wanted or not
//     (Message.CloseFiles).
//   - Descriptors received with a frame that Recv does not return (bad
//     frame, peer gone mid-frame, Conn closed) are closed by the Conn.
//
// To use a received listening socket: net.FileListener(f), then f.Close().
// Never call f.Fd(): it puts the socket into blocking mode, a flag on the
// open file description the master and every sibling share (accept would
// block in all of them and Close would hang).
//
// # Peer failure
//
// A peer that closes or dies between frames gives io.EOF from Recv; inside a
// frame, an error wrapping io.ErrUnexpectedEOF. (A peer that dies with data
// of ours unread makes Linux report ECONNRESET; Recv reports that as EOF
// too, after every frame the peer sent.) Garbage gives ErrBadFrame,
// ErrVersion or ErrTooLarge. Recv never panics on any input. After an error
// other than a read deadline, Recv keeps returning it; the caller closes the
// Conn. Send to a peer that has gone returns an error wrapping EPIPE or
// ECONNRESET, never SIGPIPE.
package ipc
