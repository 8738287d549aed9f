package bench

// A minimal worker-protocol client: handshake, SetOptions and QueryPathInfo,
// enough to load a daemon the way the Nix 2.8 client does (one request in
// flight per connection). It lives here because internal/daemon/client did
// not exist when the benchmark was written; once it does, the load loop can
// switch to it.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

const (
	workerMagic1    = 0x6e697863
	workerMagic2    = 0x6478696f
	clientVersion   = 1<<8 | 34 // what the Nix 2.8.0 client sends
	opSetOptions    = 19
	opQueryPathInfo = 26

	stderrNext          = 0x6f6c6d67
	stderrRead          = 0x64617461
	stderrWrite         = 0x64617416
	stderrLast          = 0x616c7473
	stderrError         = 0x63787470
	stderrStartActivity = 0x53545254
	stderrStopActivity  = 0x53544f50
	stderrResult        = 0x52534c54

	maxString = 1 << 20 // no reply field of these ops comes near this
)

// Conn is one client connection to a daemon socket. It is not safe for
// concurrent use.
type Conn struct {
	c             net.Conn
	r             *bufio.Reader
	w             *bufio.Writer
	Version       uint64 // negotiated protocol version
	DaemonVersion string // the Nix version string the daemon sent (v ≥ 1.33)
	scratch       []byte
}

// Dial connects to the daemon socket, performs the handshake as the Nix
// 2.8.0 client does and sends SetOptions with the values that client sends.
func Dial(ctx context.Context, socket string) (*Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", socket, err)
	}
	c := &Conn{c: nc, r: bufio.NewReaderSize(nc, 32<<10), w: bufio.NewWriterSize(nc, 32<<10), scratch: make([]byte, 256)}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	if err := c.handshake(); err != nil {
		nc.Close()
		return nil, fmt.Errorf("handshake with %s: %w", socket, err)
	}
	if err := c.setOptions(); err != nil {
		nc.Close()
		return nil, fmt.Errorf("SetOptions on %s: %w", socket, err)
	}
	nc.SetDeadline(time.Time{})
	return c, nil
}

// Close closes the connection.
func (c *Conn) Close() error { return c.c.Close() }

func (c *Conn) handshake() error {
	c.u64(workerMagic1)
	c.u64(clientVersion)
	if err := c.w.Flush(); err != nil {
		return err
	}
	magic, err := c.readU64()
	if err != nil {
		return err
	}
	if magic != workerMagic2 {
		return fmt.Errorf("bad daemon magic %#x", magic)
	}
	dv, err := c.readU64()
	if err != nil {
		return err
	}
	if dv>>8 != 1 || dv&0xff < 10 {
		return fmt.Errorf("unsupported daemon protocol version %#x", dv)
	}
	c.Version = min(dv, clientVersion)
	minor := c.Version & 0xff
	c.u64(0) // no CPU affinity (v ≥ 14)
	c.u64(0) // reserveSpace (v ≥ 11)
	if err := c.w.Flush(); err != nil {
		return err
	}
	if minor >= 33 {
		s, err := c.readString()
		if err != nil {
			return err
		}
		c.DaemonVersion = string(s)
	}
	if minor >= 35 {
		if _, err := c.readU64(); err != nil { // trust
			return err
		}
	}
	return c.processStderr()
}

func (c *Conn) setOptions() error {
	c.u64(opSetOptions)
	// keepFailed, keepGoing, tryFallback, verbosity, maxBuildJobs,
	// maxSilentTime, useBuildHook, verboseBuild, logType, printBuildTrace,
	// buildCores, useSubstitutes: as captured from `nix path-info`.
	for _, v := range []uint64{0, 0, 0, 3, 1, 0, 1, 7, 0, 0, 2, 1} {
		c.u64(v)
	}
	c.u64(0) // no overrides
	if err := c.w.Flush(); err != nil {
		return err
	}
	return c.processStderr()
}

// QueryResult is the part of a QueryPathInfo reply the benchmark looks at.
type QueryResult struct {
	Valid   bool
	NarSize uint64
	Refs    int
}

// QueryPathInfo sends op 26 for path and reads the whole reply.
func (c *Conn) QueryPathInfo(path string) (QueryResult, error) {
	var res QueryResult
	c.u64(opQueryPathInfo)
	c.str(path)
	if err := c.w.Flush(); err != nil {
		return res, fmt.Errorf("QueryPathInfo %s: %w", path, err)
	}
	if err := c.processStderr(); err != nil {
		return res, fmt.Errorf("QueryPathInfo %s: %w", path, err)
	}
	err := func() error {
		if c.Version&0xff < 17 {
			return errors.New("protocol below 1.17 not supported")
		}
		valid, err := c.readU64()
		if err != nil || valid == 0 {
			return err
		}
		res.Valid = true
		if err := c.skipString(); err != nil { // deriver
			return err
		}
		if err := c.skipString(); err != nil { // narHash
			return err
		}
		n, err := c.readU64()
		if err != nil {
			return err
		}
		res.Refs = int(n)
		if err := c.skipStrings(n); err != nil {
			return err
		}
		if _, err := c.readU64(); err != nil { // registrationTime
			return err
		}
		if res.NarSize, err = c.readU64(); err != nil {
			return err
		}
		if _, err := c.readU64(); err != nil { // ultimate
			return err
		}
		if n, err = c.readU64(); err != nil { // sigs
			return err
		}
		if err := c.skipStrings(n); err != nil {
			return err
		}
		return c.skipString() // ca
	}()
	if err != nil {
		return res, fmt.Errorf("QueryPathInfo %s: reading reply: %w", path, err)
	}
	return res, nil
}

// processStderr reads logger messages up to STDERR_LAST; STDERR_ERROR
// becomes an error.
func (c *Conn) processStderr() error {
	for {
		tag, err := c.readU64()
		if err != nil {
			return err
		}
		switch tag {
		case stderrLast:
			return nil
		case stderrNext:
			if err := c.skipString(); err != nil {
				return err
			}
		case stderrStartActivity:
			// id, level, type, text, fields, parent
			for range 3 {
				if _, err := c.readU64(); err != nil {
					return err
				}
			}
			if err := c.skipString(); err != nil {
				return err
			}
			if err := c.skipFields(); err != nil {
				return err
			}
			if _, err := c.readU64(); err != nil {
				return err
			}
		case stderrStopActivity:
			if _, err := c.readU64(); err != nil {
				return err
			}
		case stderrResult:
			for range 2 {
				if _, err := c.readU64(); err != nil {
					return err
				}
			}
			if err := c.skipFields(); err != nil {
				return err
			}
		case stderrError:
			return c.readError()
		case stderrRead, stderrWrite:
			return fmt.Errorf("unexpected logger message %#x", tag)
		default:
			return fmt.Errorf("unknown logger message %#x", tag)
		}
	}
}

func (c *Conn) readError() error {
	if c.Version&0xff < 26 {
		msg, err := c.readString()
		if err != nil {
			return err
		}
		status, err := c.readU64()
		if err != nil {
			return err
		}
		return fmt.Errorf("daemon error (status %d): %s", status, msg)
	}
	if err := c.skipString(); err != nil { // "Error"
		return err
	}
	if _, err := c.readU64(); err != nil { // level
		return err
	}
	if err := c.skipString(); err != nil { // name
		return err
	}
	msg, err := c.readString()
	if err != nil {
		return err
	}
	m := string(msg)
	if _, err := c.readU64(); err != nil { // havePos
		return err
	}
	n, err := c.readU64()
	if err != nil {
		return err
	}
	for range n {
		if _, err := c.readU64(); err != nil {
			return err
		}
		if err := c.skipString(); err != nil {
			return err
		}
	}
	return fmt.Errorf("daemon error: %s", m)
}

func (c *Conn) skipFields() error {
	n, err := c.readU64()
	if err != nil {
		return err
	}
	for range n {
		t, err := c.readU64()
		if err != nil {
			return err
		}
		switch t {
		case 0:
			_, err = c.readU64()
		case 1:
			err = c.skipString()
		default:
			err = fmt.Errorf("unknown field type %d", t)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (c *Conn) u64(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	c.w.Write(b[:]) // sticky; reported by Flush
}

func (c *Conn) str(s string) {
	c.u64(uint64(len(s)))
	c.w.WriteString(s)
	if pad := (8 - len(s)%8) % 8; pad > 0 {
		var z [8]byte
		c.w.Write(z[:pad])
	}
}

func (c *Conn) readU64() (uint64, error) {
	b, err := c.r.Peek(8)
	if err != nil {
		return 0, noEOF(err)
	}
	v := binary.LittleEndian.Uint64(b)
	c.r.Discard(8)
	return v, nil
}

// readString returns the string in a scratch buffer valid until the next read.
func (c *Conn) readString() ([]byte, error) {
	n, err := c.readU64()
	if err != nil {
		return nil, err
	}
	if n > maxString {
		return nil, fmt.Errorf("string of %d bytes", n)
	}
	padded := (n + 7) &^ 7
	if uint64(cap(c.scratch)) < padded {
		c.scratch = make([]byte, padded)
	}
	buf := c.scratch[:padded]
	if _, err := io.ReadFull(c.r, buf); err != nil {
		return nil, noEOF(err)
	}
	return buf[:n], nil
}

func (c *Conn) skipString() error {
	_, err := c.readString()
	return err
}

func (c *Conn) skipStrings(n uint64) error {
	for range n {
		if err := c.skipString(); err != nil {
			return err
		}
	}
	return nil
}

func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
