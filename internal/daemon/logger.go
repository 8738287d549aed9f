package daemon

import (
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/nixyard/nixyard/internal/daemon/wire"
)

// maxPending bounds the log messages queued while no op is running (§3.3:
// output before startWork is sent when work starts). Beyond it, messages
// are dropped: a client that never sends an op must not grow our memory.
const maxPending = 1 << 20

// activityIDs numbers activities as Nix does: (pid << 32) + counter.
var activityIDs atomic.Uint64

func init() { activityIDs.Store(uint64(os.Getpid()) << 32) }

// field is one field of an activity or result: a uint64 or a string.
type field any

// tunnel is the logger channel of one connection (§3). Messages go to the
// client only between startWork and stopWork; before that they are queued.
// It is safe for concurrent use: store callbacks may log from any goroutine.
type tunnel struct {
	mu        sync.Mutex
	enc       *wire.Encoder // shared with the replies, which are written outside work
	minor     uint64
	working   bool
	stopped   bool // stopWork was called for the current op
	pending   []byte
	verbosity Verbosity
	batches   int // open batch calls: messages are written but not flushed
}

func newTunnel(enc *wire.Encoder, minor uint64) *tunnel {
	return &tunnel{enc: enc, minor: minor, verbosity: lvlInfo}
}

func appendU64(b []byte, v uint64) []byte { return binary.LittleEndian.AppendUint64(b, v) }

func appendString(b []byte, s string) []byte {
	b = appendU64(b, uint64(len(s)))
	b = append(b, s...)
	for len(b)%8 != 0 {
		b = append(b, 0)
	}
	return b
}

func appendFields(b []byte, fields []field) []byte {
	b = appendU64(b, uint64(len(fields)))
	for _, f := range fields {
		switch v := f.(type) {
		case string:
			b = appendU64(b, 1)
			b = appendString(b, v)
		case uint64:
			b = appendU64(b, 0)
			b = appendU64(b, v)
		case int:
			b = appendU64(b, 0)
			b = appendU64(b, uint64(v))
		default:
			panic("daemon: activity field of unsupported type")
		}
	}
	return b
}

// wireLevel converts a level to what the client understands: Nix 2.3 and
// older (protocol < 1.32) have no lvlNotice, so every level above Warn is
// one lower on their wire (§4).
func (t *tunnel) wireLevel(l Verbosity) uint64 {
	if t.minor < 32 && l >= lvlNotice {
		if l == lvlNotice {
			return uint64(lvlNotice)
		}
		return uint64(l - 1)
	}
	return uint64(l)
}

// levelFromWire is the inverse of wireLevel, for SetOptions' verbosity.
func levelFromWire(minor, v uint64) Verbosity {
	if minor < 32 && v >= 2 {
		v++
	}
	return Verbosity(min(v, uint64(lvlVomit)))
}

func (t *tunnel) setVerbosity(v Verbosity) {
	t.mu.Lock()
	t.verbosity = v
	t.mu.Unlock()
}

// enqueue sends msg now if work has started, else queues it.
func (t *tunnel) enqueue(msg []byte) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.working {
		if len(t.pending)+len(msg) <= maxPending {
			t.pending = append(t.pending, msg...)
		}
		return nil
	}
	t.enc.Write(msg)
	if t.batches > 0 {
		return nil
	}
	return t.enc.Flush()
}

// batch holds back flushes until the returned function is called, so that
// a burst of messages (a queue of progress events) reaches the client in
// one write instead of one write each. Messages from other goroutines in
// the meantime join the batch.
func (t *tunnel) batch() (end func() error) {
	t.mu.Lock()
	t.batches++
	t.mu.Unlock()
	return func() error {
		t.mu.Lock()
		defer t.mu.Unlock()
		t.batches--
		if t.batches > 0 || !t.working {
			return nil
		}
		return t.enc.Flush()
	}
}

// Log sends a log line (STDERR_NEXT) if the client's verbosity allows it.
func (t *tunnel) Log(lvl Verbosity, text string) {
	t.mu.Lock()
	skip := lvl > t.verbosity
	t.mu.Unlock()
	if skip {
		return
	}
	msg := appendU64(nil, wire.StderrNext)
	msg = appendString(msg, text+"\n")
	t.enqueue(msg)
}

// Nix's colours for the prefix of a logged error or warning. The client
// strips them when its standard error is not a terminal.
const (
	ansiRed     = "\x1b[31;1m"
	ansiWarning = "\x1b[35;1m"
	ansiNormal  = "\x1b[0m"
)

// Error logs msg at error level as nix-daemon logs an error that does not
// end the op (Nix's showErrorInfo): a red "error:" before the first line,
// the later lines indented under it.
func (t *tunnel) Error(msg string) { t.Log(lvlError, nixErrorText(msg)) }

// Warn logs msg at warning level as nix-daemon logs a warning: a magenta
// "warning:" before it.
func (t *tunnel) Warn(msg string) { t.Log(lvlWarn, ansiWarning+"warning:"+ansiNormal+" "+msg) }

// LogText logs text that carries Nix's plain prefix, "error: " or
// "warning: ", the way Error or Warn would; other text goes as it is, at
// lvl. It is for messages made below the daemon (the store's verify).
func (t *tunnel) LogText(lvl Verbosity, text string) {
	if rest, ok := strings.CutPrefix(text, "error: "); ok {
		t.Error(rest)
	} else if rest, ok := strings.CutPrefix(text, "warning: "); ok {
		t.Warn(rest)
	} else {
		t.Log(lvl, text)
	}
}

// nixErrorText formats msg as Nix's showErrorInfo does: "error: " (in
// red) before the first line, every later line indented by the width of
// that prefix, trailing white space dropped from each line.
func nixErrorText(msg string) string {
	const indent = "       " // len("error: ")
	var b strings.Builder
	b.WriteString(ansiRed + "error:" + ansiNormal + " ")
	for i, line := range strings.Split(strings.TrimRight(msg, " \t\n"), "\n") {
		if i > 0 {
			b.WriteString("\n")
			line = indent + line
		}
		b.WriteString(strings.TrimRight(line, " \t"))
	}
	return b.String()
}

// StartActivity starts an activity and returns its id. Clients older than
// 1.20 get the text as a log line "<text>..." instead.
func (t *tunnel) StartActivity(lvl Verbosity, typ uint64, text string, fields []field, parent uint64) uint64 {
	id := activityIDs.Add(1)
	if t.minor < 20 {
		if text != "" {
			t.Log(lvl, text+"...")
		}
		return id
	}
	msg := appendU64(nil, wire.StderrStartActivity)
	msg = appendU64(msg, id)
	msg = appendU64(msg, t.wireLevel(lvl))
	msg = appendU64(msg, typ)
	msg = appendString(msg, text)
	msg = appendFields(msg, fields)
	msg = appendU64(msg, parent)
	t.enqueue(msg)
	return id
}

// StopActivity ends an activity.
func (t *tunnel) StopActivity(id uint64) {
	if t.minor < 20 {
		return
	}
	msg := appendU64(nil, wire.StderrStopActivity)
	msg = appendU64(msg, id)
	t.enqueue(msg)
}

// Result reports a result of an activity.
func (t *tunnel) Result(id, typ uint64, fields []field) {
	if t.minor < 20 {
		return
	}
	msg := appendU64(nil, wire.StderrResult)
	msg = appendU64(msg, id)
	msg = appendU64(msg, typ)
	msg = appendFields(msg, fields)
	t.enqueue(msg)
}

// askRead sends STDERR_READ, which asks the client for up to n bytes of
// the data an op reads through the logger channel (tunnelSource); the
// caller reads the reply from the connection.
func (t *tunnel) askRead(n int) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.enc.U64(wire.StderrRead)
	t.enc.U64(uint64(n))
	return t.enc.Flush()
}

// writeData sends p as STDERR_WRITE, data an op sends through the logger
// channel (tunnelSink). It does not flush.
func (t *tunnel) writeData(p []byte) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.enc.U64(wire.StderrWrite)
	t.enc.Bytes(p)
	return t.enc.Err()
}

// startWork sends the queued messages and lets further ones through.
func (t *tunnel) startWork() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.working = true
	if len(t.pending) > 0 {
		t.enc.Write(t.pending)
		t.pending = nil
	}
	return t.enc.Flush()
}

// beginOp resets the per-op state before an op is read.
func (t *tunnel) beginOp() {
	t.mu.Lock()
	t.stopped = false
	t.mu.Unlock()
}

// state reports whether the current op is working, and whether it has
// already ended with stopWork.
func (t *tunnel) state() (working, stopped bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.working, t.stopped
}

// stopWork ends the work phase with STDERR_LAST (err == nil) or
// STDERR_ERROR. It does not flush: the reply follows.
func (t *tunnel) stopWork(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.working = false
	t.stopped = true
	if err == nil {
		t.enc.U64(wire.StderrLast)
		return
	}
	t.enc.U64(wire.StderrError)
	msg := errorMessage(err)
	if t.minor >= 26 {
		t.enc.String("Error")
		t.enc.U64(uint64(lvlError))
		t.enc.String("Error")
		t.enc.String(msg)
		t.enc.U64(0) // no position
		t.enc.U64(0) // no traces
		return
	}
	t.enc.String(msg)
	status := uint64(1)
	var ee *exitError
	if errors.As(err, &ee) {
		status = ee.status
	}
	t.enc.U64(status)
}

// exitError is an op's error with the exit status Nix gives it, which
// clients before protocol 1.26 exit with (later ones exit with 1).
type exitError struct {
	err    error
	status uint64
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// errorMessage is the text a client shows for err.
func errorMessage(err error) string {
	var fe *fatalError
	if errors.As(err, &fe) {
		err = fe.err
	}
	return clientText(err.Error())
}

// clientText is an error's text for a client: the store's errors name
// it ("store: …") for the daemon's log, where they start or where another
// error wraps them; the client gets Nix's words ("cannot add path '…'
// because it lacks a valid signature").
func clientText(msg string) string {
	return strings.ReplaceAll(strings.TrimPrefix(msg, "store: "), ": store: ", ": ")
}
