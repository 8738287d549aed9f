package e2e

// A minimal worker-protocol client (worker-protocol.md), just enough to do
// what no real client can be made to do on purpose: hold a temp root on a
// live connection, send hostile NARs, hang up in the middle of an upload.
// It is written independently of internal/daemon (and its client package)
// on purpose: the oracle must not share the code under test, and it must
// be able to send what a well-behaved client never would.

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"testing"
)

const (
	workerMagic1 = 0x6e697863
	workerMagic2 = 0x6478696f
	clientProto  = 0x122 // 1.34, what Nix 2.8.0 speaks

	stderrNext          = 0x6f6c6d67
	stderrRead          = 0x64617461
	stderrWrite         = 0x64617416
	stderrLast          = 0x616c7473
	stderrError         = 0x63787470
	stderrStartActivity = 0x53545254
	stderrStopActivity  = 0x53544f50
	stderrResult        = 0x52534c54

	opIsValidPath   = 1
	opAddTempRoot   = 11
	opNarFromPath   = 38
	opAddToStoreNar = 39
)

// protoConn is a raw connection to a daemon.
type protoConn struct {
	c       net.Conn
	r       *bufio.Reader
	w       *bufio.Writer
	version uint64 // negotiated
	client  uint64 // the version this client speaks
	log     []string
	// acts are the activities started, in order; stopped holds the ids
	// of those stopped.
	acts    []protoActivity
	stopped map[uint64]bool
	// written collects the data of STDERR_WRITE (ExportPath's stream);
	// source, if set, answers STDERR_READ (ImportPaths for old clients).
	written []byte
	source  io.Reader
}

// protoActivity is one STDERR_START_ACTIVITY.
type protoActivity struct {
	id, typ, parent uint64
	text            string
}

// dialProto connects to the daemon socket and performs the handshake as a
// Nix 2.8.0 client would (without SetOptions).
func dialProto(t *testing.T, sock string) *protoConn {
	t.Helper()
	return dialProtoVersion(t, sock, clientProto)
}

// dialProtoVersion is dialProto for a client of another protocol version.
func dialProtoVersion(t *testing.T, sock string, version uint64) *protoConn {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dial %s: %v", sock, err)
	}
	p := &protoConn{c: c, r: bufio.NewReader(c), w: bufio.NewWriter(c), client: version}
	t.Cleanup(func() { p.c.Close() })
	if err := p.handshake(); err != nil {
		t.Fatalf("handshake with %s: %v", sock, err)
	}
	return p
}

func (p *protoConn) handshake() error {
	p.u64(workerMagic1)
	if err := p.flush(); err != nil {
		return err
	}
	magic, err := p.readU64()
	if err != nil {
		return err
	}
	if magic != workerMagic2 {
		return fmt.Errorf("daemon magic %#x, want %#x", magic, workerMagic2)
	}
	dv, err := p.readU64()
	if err != nil {
		return err
	}
	if dv>>8 != 1 || dv&0xff < 21 {
		return fmt.Errorf("daemon protocol version %#x", dv)
	}
	p.version = min(dv, p.client)
	p.u64(p.client)
	p.u64(0) // no CPU affinity
	p.u64(0) // reserveSpace
	if err := p.flush(); err != nil {
		return err
	}
	if p.version&0xff >= 33 {
		if _, err := p.readString(); err != nil {
			return fmt.Errorf("daemon version string: %w", err)
		}
	}
	if p.version&0xff >= 35 {
		if _, err := p.readU64(); err != nil {
			return fmt.Errorf("trust flag: %w", err)
		}
	}
	return p.readStderr()
}

func (p *protoConn) u64(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	p.w.Write(b[:])
}

func (p *protoConn) str(s string) {
	p.u64(uint64(len(s)))
	p.w.WriteString(s)
	if pad := (8 - len(s)%8) % 8; pad > 0 {
		p.w.Write(make([]byte, pad))
	}
}

func (p *protoConn) strs(ss []string) {
	ss = append([]string(nil), ss...)
	sort.Strings(ss)
	p.u64(uint64(len(ss)))
	for _, s := range ss {
		p.str(s)
	}
}

func (p *protoConn) flush() error { return p.w.Flush() }

func (p *protoConn) readU64() (uint64, error) {
	var b [8]byte
	if _, err := io.ReadFull(p.r, b[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// maxString bounds strings read from the daemon; replies in these tests
// are short (paths, messages).
const maxString = 1 << 20

func (p *protoConn) readString() (string, error) {
	n, err := p.readU64()
	if err != nil {
		return "", err
	}
	if n > maxString {
		return "", fmt.Errorf("string of %d bytes", n)
	}
	b := make([]byte, n+(8-n%8)%8)
	if _, err := io.ReadFull(p.r, b); err != nil {
		return "", err
	}
	return string(b[:n]), nil
}

// daemonError is an STDERR_ERROR sent by the daemon.
type daemonError struct {
	msg    string
	status uint64 // the exit status, before protocol 1.26
}

func (e *daemonError) Error() string { return "daemon error: " + e.msg }

// readStderr reads log messages up to STDERR_LAST (nil) or STDERR_ERROR
// (a *daemonError). Log lines are kept in p.log.
func (p *protoConn) readStderr() error {
	for {
		tag, err := p.readU64()
		if err != nil {
			return err
		}
		switch tag {
		case stderrLast:
			return nil
		case stderrNext:
			s, err := p.readString()
			if err != nil {
				return err
			}
			p.log = append(p.log, s)
		case stderrWrite:
			data, err := p.readString()
			if err != nil {
				return err
			}
			p.written = append(p.written, data...)
		case stderrRead:
			if p.source == nil {
				return errors.New("daemon sent STDERR_READ and the test gave no source")
			}
			n, err := p.readU64()
			if err != nil {
				return err
			}
			buf := make([]byte, min(n, 1<<20))
			k, err := io.ReadAtLeast(p.source, buf, 1)
			if err != nil && !errors.Is(err, io.EOF) {
				return err
			}
			p.str(string(buf[:k])) // empty at the end of the source
			if err := p.flush(); err != nil {
				return err
			}
		case stderrError:
			return p.readError()
		case stderrStartActivity:
			var a protoActivity
			if a.id, err = p.readU64(); err != nil {
				return err
			}
			if _, err := p.readU64(); err != nil { // level
				return err
			}
			if a.typ, err = p.readU64(); err != nil {
				return err
			}
			if a.text, err = p.readString(); err != nil {
				return err
			}
			p.log = append(p.log, a.text)
			if err := p.readFields(); err != nil {
				return err
			}
			if a.parent, err = p.readU64(); err != nil {
				return err
			}
			p.acts = append(p.acts, a)
		case stderrStopActivity:
			id, err := p.readU64()
			if err != nil {
				return err
			}
			if p.stopped == nil {
				p.stopped = map[uint64]bool{}
			}
			p.stopped[id] = true
		case stderrResult:
			if _, err := p.readU64(); err != nil { // id
				return err
			}
			if _, err := p.readU64(); err != nil { // type
				return err
			}
			if err := p.readFields(); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unknown stderr message tag %#x", tag)
		}
	}
}

func (p *protoConn) readFields() error {
	n, err := p.readU64()
	if err != nil {
		return err
	}
	for i := uint64(0); i < n; i++ {
		typ, err := p.readU64()
		if err != nil {
			return err
		}
		switch typ {
		case 0:
			_, err = p.readU64()
		case 1:
			_, err = p.readString()
		default:
			err = fmt.Errorf("unknown field type %d", typ)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (p *protoConn) readError() error {
	if p.version&0xff < 26 {
		msg, err := p.readString()
		if err != nil {
			return err
		}
		status, err := p.readU64()
		if err != nil {
			return err
		}
		return &daemonError{msg: msg, status: status}
	}
	if typ, err := p.readString(); err != nil || typ != "Error" {
		return fmt.Errorf("error struct: type %q, %v", typ, err)
	}
	if _, err := p.readU64(); err != nil { // level
		return err
	}
	if _, err := p.readString(); err != nil { // name
		return err
	}
	msg, err := p.readString()
	if err != nil {
		return err
	}
	if _, err := p.readU64(); err != nil { // havePos
		return err
	}
	nt, err := p.readU64()
	if err != nil {
		return err
	}
	for i := uint64(0); i < nt; i++ {
		if _, err := p.readU64(); err != nil {
			return err
		}
		if _, err := p.readString(); err != nil {
			return err
		}
	}
	return &daemonError{msg: msg}
}

// addTempRoot sends AddTempRoot(path) and waits for the reply.
func (p *protoConn) addTempRoot(t *testing.T, path string) {
	t.Helper()
	p.u64(opAddTempRoot)
	p.str(path)
	if err := p.flush(); err != nil {
		t.Fatalf("AddTempRoot %s: %v", path, err)
	}
	if err := p.readStderr(); err != nil {
		t.Fatalf("AddTempRoot %s: %v", path, err)
	}
	if v, err := p.readU64(); err != nil || v != 1 {
		t.Fatalf("AddTempRoot %s: reply %d, %v", path, v, err)
	}
}

// isValidPath sends IsValidPath(path).
func (p *protoConn) isValidPath(t *testing.T, path string) bool {
	t.Helper()
	p.u64(opIsValidPath)
	p.str(path)
	if err := p.flush(); err != nil {
		t.Fatalf("IsValidPath %s: %v", path, err)
	}
	if err := p.readStderr(); err != nil {
		t.Fatalf("IsValidPath %s: %v", path, err)
	}
	v, err := p.readU64()
	if err != nil {
		t.Fatalf("IsValidPath %s: %v", path, err)
	}
	return v != 0
}

// narUpload describes an AddToStoreNar request.
type narUpload struct {
	path    string
	nar     []byte // the NAR bytes actually sent
	narHash string // declared; defaults to the sha256 of nar
	narSize uint64 // declared; defaults to len(nar)
	refs    []string
}

// sendAddToStoreNar writes the request and the first `send` bytes of the
// NAR as 32 KiB frames; if send is the whole NAR, the terminating empty
// frame follows. It does not read the reply.
func (p *protoConn) sendAddToStoreNar(u narUpload, send int) error {
	if u.narHash == "" {
		sum := sha256.Sum256(u.nar)
		u.narHash = hex.EncodeToString(sum[:])
	}
	if u.narSize == 0 {
		u.narSize = uint64(len(u.nar))
	}
	p.u64(opAddToStoreNar)
	p.str(u.path)
	p.str("") // deriver
	p.str(u.narHash)
	p.strs(u.refs)
	p.u64(0) // registrationTime
	p.u64(u.narSize)
	p.u64(0)    // ultimate
	p.strs(nil) // sigs
	p.str("")   // ca
	p.u64(0)    // repair
	p.u64(1)    // dontCheckSigs (honoured for trusted clients)
	const frame = 32 << 10
	data := u.nar[:send]
	for len(data) > 0 {
		n := min(frame, len(data))
		p.u64(uint64(n))
		p.w.Write(data[:n])
		data = data[n:]
	}
	if send == len(u.nar) {
		p.u64(0)
	}
	return p.flush()
}

// addToStoreNar uploads a whole NAR and returns the daemon's verdict (nil
// on STDERR_LAST, a *daemonError on STDERR_ERROR).
func (p *protoConn) addToStoreNar(u narUpload) error {
	if err := p.sendAddToStoreNar(u, len(u.nar)); err != nil {
		return err
	}
	return p.readStderr()
}

// --- NAR tokens ---

// narWriter writes NAR tokens by hand, so tests can write hostile NARs.
type narWriter struct{ b []byte }

func (n *narWriter) str(s string) *narWriter {
	return n.strLen(s, uint64(len(s)))
}

// strLen writes s with a length prefix of declared (which may lie).
func (n *narWriter) strLen(s string, declared uint64) *narWriter {
	var l [8]byte
	binary.LittleEndian.PutUint64(l[:], declared)
	n.b = append(n.b, l[:]...)
	n.b = append(n.b, s...)
	n.b = append(n.b, make([]byte, (8-len(s)%8)%8)...)
	return n
}

func (n *narWriter) toks(ss ...string) *narWriter {
	for _, s := range ss {
		n.str(s)
	}
	return n
}

// narRegular is the NAR of a regular file.
func narRegular(contents string, executable bool) []byte {
	n := &narWriter{}
	n.toks("nix-archive-1", "(", "type", "regular")
	if executable {
		n.toks("executable", "")
	}
	n.toks("contents", contents, ")")
	return n.b
}

// narEntry is a directory entry for narDir: name and the node's tokens
// (without the NAR magic).
type narEntry struct {
	name string
	node []string
}

// narDir is the NAR of a directory with the given entries in the given
// order (no sorting or checking: tests use it to break the rules).
func narDir(entries ...narEntry) []byte {
	n := &narWriter{}
	n.toks("nix-archive-1", "(", "type", "directory")
	for _, e := range entries {
		n.toks("entry", "(", "name", e.name, "node")
		n.toks(e.node...)
		n.toks(")")
	}
	n.toks(")")
	return n.b
}

// regularNode is the token list of a regular file node.
func regularNode(contents string) []string {
	return []string{"(", "type", "regular", "contents", contents, ")"}
}

// nix32Alphabet is Nix's base-32 alphabet.
const nix32Alphabet = "0123456789abcdfghijklmnpqrsvwxyz"

// randomStorePath returns a store path with a random hash part, as an
// input-addressed path that no derivation produces.
func randomStorePath(t *testing.T, name string) string {
	t.Helper()
	b := randomBytes(t, 32)
	h := make([]byte, 32)
	for i := range h {
		h[i] = nix32Alphabet[b[i]%32]
	}
	return "/nix/store/" + string(h) + "-" + name
}
