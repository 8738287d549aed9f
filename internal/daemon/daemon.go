// Package daemon serves the Nix daemon worker protocol (protocol 1.21 to
// 1.37) on top of the local store: the handshake, the logger channel,
// client trust, and the store operations. Only it and its subpackages
// know the wire (wire: the protocol's primitives; client: a Go client);
// the store knows nothing of it. The § numbers in comments are sections
// of docs/worker-protocol.md, the project's reference for the protocol.
//
// The files:
//
//   - daemon.go: Server and its Options, and one connection's life:
//     serve runs the handshake, then nextOp, perform and finishOp for
//     each op.
//   - listen.go: the listening sockets and their policies (--listen),
//     and ServeAll; stop.go: the daemon's stop (the drain, closing idle
//     connections).
//   - trust.go: who a peer is (SO_PEERCRED) and whether it is trusted;
//     jobs.go: a connection's CI job (package jobs), its roots, and what
//     a job socket refuses.
//   - handshake.go, protocol.go: the handshake; the version, log levels,
//     activity types and op names.
//   - logger.go: the tunnel, one connection's logger channel: STDERR_*
//     messages, an op's work phase, errors as the client shows them.
//   - ops.go: the op table. The ops: ops_query.go (path info),
//     ops_add.go (adding paths), ops_export.go (sending NARs),
//     ops_roots.go (roots, the collector, optimise, verify),
//     ops_substitute.go and ops_build.go (realising paths),
//     ops_build_derivation.go, ops_realisation.go, settings.go
//     (SetOptions, and what the client's settings mean).
//   - narstream.go: data outside framed streams (a raw NAR, STDERR_READ,
//     STDERR_WRITE); basic_derivation.go: BuildDerivation's derivation.
//   - substituters.go: the client's caches, and downloads' progress as
//     Nix's messages; build_progress.go: builds' progress;
//     build_realise.go: the Builder as realise's, with the client's
//     build options.
//   - hangup.go: stopping an op whose client hung up.
//   - forward.go, hooksocket.go, systemd.go: --stdio forwarding, the
//     build hook's socket, systemd's sockets.
package daemon

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nixyard/nixyard/internal/build"
	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/jobs"
	"github.com/nixyard/nixyard/internal/metrics"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/realise"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/substitute"
)

// Options configure a Server.
type Options struct {
	Store *store.Store
	// TrustedUsers is nix.conf trusted-users: user names, "@group", "*".
	// Nil means Nix's default, "root".
	TrustedUsers []string
	// AllowedUsers is nix.conf allowed-users. Nil means Nix's default, "*".
	AllowedUsers []string
	// BuildUsersGroup is nix.conf build-users-group; users whose primary
	// group it is are refused, as nix-daemon does. "" disables the check.
	BuildUsersGroup string
	// Settings is the daemon's effective nix.conf, used to filter the
	// settings clients send (substituters, trusted-substituters).
	Settings map[string]string
	// Realise is the host's substitution (and build) state; nil means no
	// binary caches.
	Realise *realise.Manager
	// Builder builds derivations (BuildDerivation, and builds through
	// Realise); nil means the daemon does not build.
	Builder *build.Builder
	// Jobs groups the connections of a container's job into one job
	// session (see package jobs); nil gives every connection its own.
	Jobs *jobs.Manager
	// Metrics counts connections and operations; nil counts nothing.
	Metrics *metrics.Metrics
	Logger  *slog.Logger
	// ShutdownGrace is how long ServeAll, once its context is done, goes
	// on serving the connections open then (no new ones), so that the
	// builds and commands under way finish; 0 stops them at once.
	// StopNow, when closed, ends the grace.
	ShutdownGrace time.Duration
	StopNow       <-chan struct{}
	// Busy, if set, counts other work the drain waits for within the
	// grace, besides connections (NARs the HTTP binary cache sends).
	Busy func() int

	// Waits, zero for their defaults (tests shorten them): for a socket
	// client's handshake (a minute), for a refused client's (it hears
	// why once it has said hello; 2 s), and the idleness after which a
	// stopping daemon closes a connection (20 s).
	handshakeTimeout, refusedHandshakeTimeout, idleCloseAfter time.Duration
	// uploadStall is how long an upload may send nothing before it is
	// abandoned (defaultUploadStall).
	uploadStall time.Duration
	// clientCPU reads a client process's CPU time (procCPU; tests fake it).
	clientCPU func(pid int32) (ticks uint64, ok bool)
	// beforeOp, if set, runs before each op's handler (tests make an op
	// panic with it).
	beforeOp func(op uint64)
}

// Server serves worker-protocol connections. It is safe for concurrent use.
type Server struct {
	opts Options
	log  *slog.Logger
	dir  storepath.Dir

	open    atomic.Int64  // socket connections being served
	changed chan struct{} // signalled (without blocking) when one ends

	// outsideWarned: the daemon has logged that a job socket's client was
	// outside its pid namespace (see applyPolicy).
	outsideWarned sync.Once

	connsMu sync.Mutex
	conns   map[*conn]func()  // socket connections, with what wakes each from its wait
	cpuSeen map[int32]cpuMark // clients' CPU time, as closeIdle last saw it
}

// New returns a Server for opts.
func New(opts Options) *Server {
	if opts.TrustedUsers == nil {
		opts.TrustedUsers = []string{"root"}
	}
	if opts.AllowedUsers == nil {
		opts.AllowedUsers = []string{"*"}
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	opts.handshakeTimeout = cmp.Or(opts.handshakeTimeout, time.Minute)
	opts.refusedHandshakeTimeout = cmp.Or(opts.refusedHandshakeTimeout, 2*time.Second)
	opts.idleCloseAfter = cmp.Or(opts.idleCloseAfter, 20*time.Second)
	opts.uploadStall = cmp.Or(opts.uploadStall, defaultUploadStall)
	if opts.clientCPU == nil {
		opts.clientCPU = procCPU
	}
	s := &Server{opts: opts, log: log, changed: make(chan struct{}, 1), conns: map[*conn]func(){}, cpuSeen: map[int32]cpuMark{}}
	if opts.Store != nil {
		s.dir = opts.Store.Dir()
	}
	return s
}

// Serve accepts connections on l and serves each in its own goroutine, with
// trust decided from the peer's SO_PEERCRED credentials. It returns when ctx
// is done (closing l and, after the shutdown grace, every connection, and
// waiting for their goroutines), or on a permanent accept error.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	return s.ServeAll(ctx, []Listener{{Listener: l}})
}

// serveListener accepts connections on l, with policy pol, until accept
// is done; the connections are served until conns is done.
func (s *Server) serveListener(accept, conns context.Context, l net.Listener, pol ListenPolicy) error {
	ctx, cancel := context.WithCancel(accept)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()

	var wg sync.WaitGroup
	defer wg.Wait()
	backoff := 5 * time.Millisecond
	var open atomic.Int64      // connections open on this socket
	var told atomic.Int64      // connections beyond the cap being told why
	var capLogged atomic.Int64 // when the cap was last logged (unix seconds)
	// serveCounted serves nc with serve, counted in counter (which the
	// caller has added it to) until it ends.
	serveCounted := func(nc net.Conn, counter *atomic.Int64, serve func(context.Context, net.Conn, ListenPolicy)) {
		wg.Add(1)
		s.open.Add(1)
		go func() {
			defer wg.Done()
			defer s.connEnded()
			defer counter.Add(-1)
			defer nc.Close()
			serve(conns, nc, pol)
		}()
	}
	for {
		nc, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) {
				s.log.Warn("accept failed; retrying", "err", err, "backoff", backoff)
				select {
				case <-time.After(backoff):
				case <-ctx.Done():
					return nil
				}
				backoff = min(2*backoff, time.Second)
				continue
			}
			return fmt.Errorf("daemon: accept: %w", err)
		}
		backoff = 5 * time.Millisecond
		if n := open.Add(1); pol.MaxConns > 0 && n > int64(pol.MaxConns) {
			open.Add(-1)
			if now := time.Now().Unix(); capLogged.Swap(now) < now-10 {
				s.log.Warn("refusing connections: the socket has as many open as it may (max-connections)", "socket", l.Addr().String(), "max", pol.MaxConns, "tenant", pol.Tenant)
			}
			// A few are told why, each within the refused handshake's
			// wait; the rest of a flood is closed at once, unheard: it
			// must not hold descriptors.
			if told.Add(1) > maxToldOverCap {
				told.Add(-1)
				nc.Close()
				continue
			}
			serveCounted(nc, &told, s.refuseOverCap)
			continue
		}
		serveCounted(nc, &open, s.serveNetConn)
	}
}

// maxToldOverCap is how many connections beyond a socket's max-connections
// are told why they are refused at once; more are closed unheard.
const maxToldOverCap = 16

// refuseOverCap tells a client of a socket that has as many connections
// open as it may why it is refused, as a refused peer is told (see serve),
// without counting it against its job.
func (s *Server) refuseOverCap(ctx context.Context, nc net.Conn, pol ListenPolicy) {
	p := s.identify(nc)
	p.trusted, p.tenant = false, pol.Tenant
	p.refused = fmt.Sprintf("too many connections: the daemon's socket has %d open, as many as it may (max-connections); try again later", pol.MaxConns)
	s.servePeer(ctx, nc, p, s.log.With("pid", p.pid, "user", p.user, "tenant", p.tenant))
}

// readDeadliner is a client's stream whose reads can be given a deadline
// (a socket; not --stdio's pipes).
type readDeadliner interface{ SetReadDeadline(time.Time) error }

// linger waits, for at most stoppingDelay, for the client to close after
// the daemon has said its last word without reading the client's request:
// closing a socket with unread data would reset it, and the client could
// lose what it was told.
func linger(r io.Reader) {
	if cw, ok := r.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	if dl, ok := r.(readDeadliner); ok {
		dl.SetReadDeadline(time.Now().Add(stoppingDelay))
	}
	io.Copy(io.Discard, r)
}

// connEnded counts a connection's end, and tells a draining ServeAll.
func (s *Server) connEnded() {
	s.open.Add(-1)
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// serveNetConn authenticates a socket peer and serves it.
func (s *Server) serveNetConn(ctx context.Context, nc net.Conn, pol ListenPolicy) {
	p := s.identify(nc)
	s.applyPolicy(&p, pol)
	log := s.log.With("pid", p.pid, "user", p.user)
	if p.tenant != "" {
		log = log.With("tenant", p.tenant)
	}
	if p.job != nil {
		defer p.job.Release()
		log = log.With("job", p.job.ID())
	}
	if p.refused != "" {
		log.Warn("refusing connection", "reason", p.refused)
	} else {
		log.Info(fmt.Sprintf("accepted connection from pid %s, user %s (%s)", p.pidString(), p.user, p.trust()))
	}
	s.servePeer(ctx, nc, p, log)
}

// servePeer serves socket connection nc from peer p until it ends, or
// until ctx does (the daemon's stop: then after stoppingDelay, so that
// the client reads why its op ended).
func (s *Server) servePeer(ctx context.Context, nc net.Conn, p peer, log *slog.Logger) {
	stop := context.AfterFunc(ctx, func() {
		if errors.Is(context.Cause(ctx), errStopping) {
			// The operation under way ends with errStopping, which its
			// client should read before the connection goes.
			time.AfterFunc(stoppingDelay, func() { nc.Close() })
			return
		}
		nc.Close()
	})
	defer stop()
	mc := s.opts.Metrics.Conn(p.tenant, p.trust())
	defer mc.Close()
	err := s.serve(ctx, nc, nc, p, log, mc)
	if err != nil && ctx.Err() == nil {
		log.Warn("connection ended with an error", "err", err)
	}
}

// ServeConn serves one client over a stream (nix-daemon --stdio), with the
// given trust. It returns when the client closes the stream, on a protocol
// error, or when ctx is done (if r is an io.Closer it is then closed to
// unblock the read).
func (s *Server) ServeConn(ctx context.Context, r io.Reader, w io.Writer, trusted bool) error {
	if c, ok := r.(io.Closer); ok {
		stop := context.AfterFunc(ctx, func() { c.Close() })
		defer stop()
	}
	p := peer{pid: -1, user: "(stdio)", trusted: trusted}
	mc := s.opts.Metrics.Conn("", p.trust())
	defer mc.Close()
	err := s.serve(ctx, r, w, p, s.log.With("user", p.user), mc)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// fatalError marks an error after which the connection cannot go on (the
// stream is out of sync); it is reported to the client, then the
// connection is closed.
type fatalError struct{ err error }

func (e *fatalError) Error() string { return e.err.Error() }
func (e *fatalError) Unwrap() error { return e.err }

func fatal(err error) error {
	if err == nil {
		return nil
	}
	return &fatalError{err}
}

// conn is the state of one client connection. The goroutine serving it
// owns it, except for what other goroutines (store callbacks, the
// progress writers, closeIdle) reach: the tunnel, the warnings sent
// (warnMu) and idleSince.
type conn struct {
	srv     *Server
	st      *store.Store
	dir     storepath.Dir
	raw     io.Reader     // the client's stream under br (for deadlines and linger)
	br      *bufio.Reader // what in reads; framed and raw uploads read it too
	in      *wire.Decoder
	out     *wire.Encoder // shared by the replies and the tunnel
	minor   uint64        // the protocol's minor version, the client's or ours if lower
	peer    peer
	log     *slog.Logger
	tun     *tunnel           // the logger channel (set by the handshake)
	session *store.Session    // the temporary roots of the connection, or of its job
	gcCheck store.AutoGCCheck // when its requests last had the free space checked
	// idleSince is when the connection began to wait for its handshake
	// or its next op (Unix nanoseconds; 0 while an op runs; idleClaimed
	// once closeIdle has taken it): see Server.closeIdle.
	idleSince atomic.Int64
	// settings are what the client sent with SetOptions (not to be
	// confused with srv.opts, the daemon's Options).
	settings clientSettings

	// narinfos keeps what file:// caches told this connection's lookups.
	narinfos substitute.ConnNarinfos
	// hup watches for the client hanging up during a build (nil: the
	// connection has no descriptor to watch).
	hup *hangupWatcher

	warnMu sync.Mutex
	warned map[string]bool // warnings sent (see warnFunc)
}

// serve runs one connection: handshake, then ops until EOF or an error
// that ends the connection. A panic ends only this connection.
func (s *Server) serve(ctx context.Context, r io.Reader, w io.Writer, p peer, log *slog.Logger, mc *metrics.Conn) (err error) {
	defer func() {
		if v := recover(); v != nil {
			log.Error("panic while serving a connection", "panic", v, "stack", string(debug.Stack()))
			err = fmt.Errorf("daemon: internal error: %v", v)
		}
	}()
	br := bufio.NewReaderSize(r, 64<<10)
	c := &conn{
		srv:  s,
		st:   s.opts.Store,
		dir:  s.dir,
		raw:  r,
		br:   br,
		in:   wire.NewDecoder(br),
		out:  wire.NewEncoder(w),
		peer: p,
		log:  log,
		hup:  newHangupWatcher(r),
	}
	dl, _ := r.(readDeadliner)
	defer s.trackIdle(c, r, dl)()
	if ok, err := c.handshakeInTime(ctx, dl); !ok {
		return err
	}
	if c.st != nil {
		var release func()
		c.session, release = c.openSession()
		defer release()
	}
	// What file:// caches tell this connection's lookups, for all its ops.
	ctx = substitute.WithConnNarinfos(ctx, &c.narinfos)
	// Whose download slots its substitutions take: its job's, or its
	// client process's (see substitute.WithShare).
	ctx = substitute.WithShare(ctx, c.downloadShare())
	// When its requests last had the free space checked, for all its ops.
	ctx = store.WithAutoGCCheck(ctx, &c.gcCheck)
	return c.serveOps(ctx, r, dl, mc)
}

// handshakeInTime runs the handshake. A socket peer that does not
// complete it in time (an idle connection a job opened and left) gives
// its descriptor back: Nix clients send their part at once. ok is false
// when the connection ends, with err nil if there is nothing more to log.
func (c *conn) handshakeInTime(ctx context.Context, dl readDeadliner) (ok bool, err error) {
	if dl != nil {
		timeout := c.srv.opts.handshakeTimeout
		if c.peer.refused != "" {
			timeout = c.srv.opts.refusedHandshakeTimeout
		}
		dl.SetReadDeadline(time.Now().Add(timeout))
	}
	if err := c.handshake(ctx); err != nil {
		switch {
		case c.idleSince.Load() == idleClaimed:
			return false, nil // closed by closeIdle, which says so
		case errors.Is(err, errNoHello):
			c.log.Debug("connection closed", "err", err)
			return false, nil
		case c.peer.refused != "":
			return false, nil // logged as refused when it came
		}
		return false, err
	}
	if dl != nil {
		dl.SetReadDeadline(time.Time{})
	}
	return true, nil
}

// serveOps serves the client's ops, one after the other, until the
// connection ends; it counts each in mc (if not nil).
func (c *conn) serveOps(ctx context.Context, r io.Reader, dl readDeadliner, mc *metrics.Conn) error {
	ops := 0
	defer func() { c.log.Debug("connection closed", "ops", ops) }()
	// Decided once per connection: the op loop is the hot path, and a
	// disabled Debug call still boxes its arguments.
	debug := c.log.Enabled(ctx, slog.LevelDebug)
	for {
		op, ok, err := c.nextOp(ctx, r, dl)
		if !ok {
			return err
		}
		ops++
		c.tun.beginOp()
		if debug {
			c.log.Debug("received daemon op", "op", op, "name", opName(op))
		}
		var start time.Time
		if mc != nil {
			start = time.Now()
		}
		if end, err := c.finishOp(op, c.perform(ctx, op), mc, start); end {
			return err
		}
	}
}

// nextOp waits for the client's next op and reads its code. ok is false
// when the connection ends: with err nil at the client's EOF, when the
// daemon stops, or when closeIdle took the connection (an op that came
// just then is told why it is not served).
func (c *conn) nextOp(ctx context.Context, r io.Reader, dl readDeadliner) (op uint64, ok bool, err error) {
	since := time.Now().UnixNano()
	c.idleSince.Store(since)
	_, err = c.br.Peek(1)
	if err != nil && c.idleSince.Load() == idleClaimed && dl != nil {
		// closeIdle's deadline ends a read whatever waits: an op that
		// came just before it is in the buffer.
		dl.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
		_, err = c.br.Peek(1)
	}
	if err != nil {
		if err == io.EOF || ctx.Err() != nil || c.idleSince.Load() == idleClaimed {
			return 0, false, nil
		}
		return 0, false, fmt.Errorf("daemon: reading op: %w", err)
	}
	if !c.idleSince.CompareAndSwap(since, 0) {
		// closeIdle took the connection as the client's op came: it hears
		// why it is not served.
		c.tun.stopWork(errStopping)
		if c.out.Flush() == nil {
			linger(r)
		}
		return 0, false, nil
	}
	op = c.in.U64("op")
	if err := c.in.Err(); err != nil {
		return 0, false, fmt.Errorf("daemon: reading op: %w", err)
	}
	return op, true, nil
}

// finishOp sends what follows op's handler's result opErr: the reply
// (already encoded) or the error, and counts the op in mc (if not nil)
// once it was answered. end reports that the connection ends, with err
// (nil for a client that hung up).
func (c *conn) finishOp(op uint64, opErr error, mc *metrics.Conn, start time.Time) (end bool, err error) {
	count := func(err error) {
		if mc != nil {
			mc.Op(opName(op), time.Since(start), err)
		}
	}
	if errors.Is(opErr, errHangup) {
		count(opErr)
		// Nobody to tell: the op was stopped for a client that is gone.
		c.log.Info("the client hung up; its operation stopped", "op", opName(op))
		return true, nil
	}
	if opErr != nil {
		working, stopped := c.tun.state()
		if stopped && errors.Is(opErr, errStopping) {
			// The daemon's stop ended the op after it had said its last
			// word (its reply under way, or the stop told at once by
			// withFramed): the connection just ends.
			count(opErr)
			return true, nil
		}
		if stopped {
			// The reply was under way (e.g. a NAR after STDERR_LAST):
			// nothing more can be said on this stream.
			return true, fmt.Errorf("daemon: op %s (%d): after its reply started: %w", opName(op), op, opErr)
		}
		var fe *fatalError
		// An error before startWork (unknown op, bad arguments) is sent,
		// then the connection is closed: the rest of the request cannot
		// be told apart from the next one.
		isFatal := errors.As(opErr, &fe) || !working
		c.tun.stopWork(opErr)
		if ferr := c.out.Flush(); ferr != nil {
			return true, fmt.Errorf("daemon: op %s (%d): %w (and sending the error: %v)", opName(op), op, opErr, ferr)
		}
		count(opErr)
		if isFatal {
			return true, fmt.Errorf("daemon: op %s (%d): %w", opName(op), op, opErr)
		}
		c.log.Debug("op failed", "op", opName(op), "err", opErr)
		return false, nil
	}
	if err := c.out.Flush(); err != nil {
		return true, fmt.Errorf("daemon: op %s (%d): sending reply: %w", opName(op), op, err)
	}
	count(nil)
	return false, nil
}

// args checks the decoder after the arguments of op have been read.
func (c *conn) args(op uint64) error {
	if err := c.in.Err(); err != nil {
		return fmt.Errorf("operation '%s' (%d): reading arguments: %w", opName(op), op, err)
	}
	return nil
}

// startWork begins the work phase of an op (§3).
func (c *conn) startWork() error { return c.tun.startWork() }

// stopWork ends it successfully: STDERR_LAST, then the caller writes the reply.
func (c *conn) stopWork() { c.tun.stopWork(nil) }

// perform runs one op. Arguments are read before startWork; errors
// returned while working end only the op.
func (c *conn) perform(ctx context.Context, op uint64) error {
	h, ok := handlers[op]
	if !ok {
		switch op {
		case wire.OpQueryFailedPaths, wire.OpClearFailedPaths:
			return fmt.Errorf("operation '%s' (%d) was removed from Nix and is not supported", opName(op), op)
		default:
			return fmt.Errorf("invalid operation %d", op)
		}
	}
	if c.st == nil && op != wire.OpSetOptions && op != wire.OpSyncWithGC {
		return fmt.Errorf("operation '%s' (%d): no store is configured", opName(op), op)
	}
	if c.srv.opts.beforeOp != nil {
		c.srv.opts.beforeOp(op)
	}
	if t, ok := c.narinfoTTLs(); ok {
		ctx = substitute.WithNarinfoTTLs(ctx, t)
	}
	ctx = store.WithClientLog(ctx, func(msg string) { c.tun.Log(lvlInfo, msg) })
	switch op {
	case wire.OpBuildPaths, wire.OpBuildPathsWithResults, wire.OpBuildDerivation, wire.OpEnsurePath,
		wire.OpQueryMissing, wire.OpQuerySubstitutablePathInfos,
		wire.OpCollectGarbage, wire.OpOptimiseStore, wire.OpVerifyStore:
		// Builds, downloads and store maintenance whose client hangs up
		// stop, as with nix-daemon, unless other clients wait for the
		// build or download too. (Not on
		// the frequent queries that only read the store: the watch costs
		// a descriptor, a pipe and a goroutine; QueryValidPaths watches
		// when it substitutes.)
		var stop func()
		ctx, stop = c.hup.watch(ctx)
		defer stop()
	}
	err := h(ctx, c)
	switch {
	case err == nil:
	case errors.Is(context.Cause(ctx), errHangup):
		return errHangup // whatever the op made of its cancelled context
	case errors.Is(context.Cause(ctx), errStopping):
		return fatal(errStopping)
	}
	return err
}
