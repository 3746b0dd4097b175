// Package master runs sniproxy's master process: it holds every listening
// socket (as raw descriptors, outside the Go runtime's epoll, passed to the
// successor over the state socket so that they outlive the process across
// a reload), starts one worker process per slot and gives each its
// sockets, restarts workers that die, grants connection permits from the
// global limit (package lease), owns the cumulative counters the workers
// push, and serves /metrics, /healthz and the control socket. It never
// proxies a connection itself.
//
// A Master is composed of parts, each in its own file with one owner of
// its state:
//
//   - supervisor (supervisor.go): the worker processes: spawn, read their
//     messages, reap, restart with backoff, the crash budget.
//   - broker (broker.go): the permit broker: lease grants, revokes of
//     spares, returns, the reserve sent to the successor.
//   - counters (counters.go): the cumulative counters and their Deltas to
//     the successor.
//   - sockets (sockets.go): the proxy's listening sockets, held as raw
//     descriptors (one in the runtime's epoll would wake the master for
//     every connection queued on it): inherited or bound, given to each
//     worker slot, copied for the successor.
//   - succession (succession.go, statesocket.go): inheriting from the
//     predecessor over the state socket (the listening sockets, then the
//     succession state), and a reload: hurry, state and move sockets,
//     tableflip Upgrade, successor ready.
//   - relay (relay.go): moved connections, from the predecessor to this
//     generation's workers and from them to the successor.
//   - shutdown (shutdown.go): retire the workers, drain, stop now.
//   - health (health.go): the pool backends' health table, one for every
//     worker: active checks (one jittered prober per backend and check,
//     never one per worker; a pool without a check gets a tcp check of its
//     down backends), the workers' dial reports, up/down decisions sent to
//     every worker; the per-backend connection counters.
//   - endpoints (control.go): the metrics and control servers.
//
// The master's loop (Master.loop) owns the order of events: signals,
// reload requests and outcomes, worker exits and restarts.
//
// Lock order. A part holds its own lock while it calls into another only
// along this order, never against it:
//
//	relay.mu → broker.mu → perIP.mu → counters.mu → health.mu → supervisor.mu → child.mu
//
// (relay.mu is held while a moved connection is sent to a worker and
// takes supervisor.mu to list them; broker.mu and perIP.mu are held while
// the succession state is sent, which takes counters.mu, which takes
// health.mu to add the health table and to count per-backend connections.)
// The health part sends its table to the workers under its own sendMu,
// taken under no other lock and before health.mu and supervisor.mu, never
// under health.mu: a worker slow to read cannot stall the master's
// readers. perIP.pred.mu (the predecessor's client counts) is taken under
// relay.mu or under none, never with perIP.mu held, and takes only
// perip.Table's lock. The locks inside lease.Pool, perip.Table,
// stateSocket (its writer, and the descriptors its reader received),
// socketSet and ipc.Conn are leaves: taken last, under any of these.
package master
