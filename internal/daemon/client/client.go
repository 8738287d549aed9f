// Package client is a small Go client of the Nix daemon worker protocol,
// for tests and benchmarks of nixyard (and of nix-daemon, for comparison)
// and for `nixyard doctor`.
// It speaks the protocol version it is given, so tests can act as old
// clients. A Client is not safe for concurrent use.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// DefaultVersion is the protocol version a Client offers unless told
// otherwise: 1.34, what Nix 2.8 speaks.
const DefaultVersion = 1<<8 | 34

// RemoteError is an error the daemon reported with STDERR_ERROR.
type RemoteError struct {
	Msg    string
	Status uint64 // exit status, protocol < 1.26 only
}

func (e *RemoteError) Error() string { return "daemon: " + e.Msg }

// Client is one connection to a daemon.
type Client struct {
	conn    net.Conn
	br      *bufio.Reader // under In
	In      *wire.Decoder
	Out     *wire.Encoder
	Minor   uint64
	Version string // daemon Nix version (protocol ≥ 1.33)
	Trust   uint64 // 0 unknown, 1 trusted, 2 not trusted (protocol ≥ 1.35)
	Dir     storepath.Dir
	// Logs receives STDERR_NEXT lines; nil drops them.
	Logs func(line string)
	// ReadSource answers STDERR_READ requests; nil fails them.
	ReadSource io.Reader
	// WriteSink receives STDERR_WRITE data; nil drops it.
	WriteSink io.Writer
	// Activities receives the level, type and text of each started
	// activity; nil drops them.
	Activities func(level, typ uint64, text string)
	// Verbosity is the level SetOptions asks for: 0 means info (3), as
	// a Nix client without -v.
	Verbosity uint64
}

// Dial connects to the daemon socket at path, runs the handshake offering
// DefaultVersion, and sends default SetOptions.
func Dial(ctx context.Context, socketPath string) (*Client, error) {
	return DialVersion(ctx, socketPath, DefaultVersion, true)
}

// DialVersion is Dial with a chosen protocol version; setOptions says
// whether to send SetOptions after the handshake.
func DialVersion(ctx context.Context, socketPath string, version uint64, setOptions bool) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("client: dial %s: %w", socketPath, err)
	}
	c := New(nc)
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
		defer nc.SetDeadline(time.Time{})
	}
	if err := c.Handshake(version); err != nil {
		nc.Close()
		return nil, err
	}
	if setOptions {
		if err := c.SetOptions(nil); err != nil {
			nc.Close()
			return nil, err
		}
	}
	return c, nil
}

// New wraps an established connection; call Handshake next.
func New(nc net.Conn) *Client {
	br := bufio.NewReaderSize(nc, 64<<10)
	return &Client{conn: nc, br: br, In: wire.NewDecoder(br), Out: wire.NewEncoder(nc), Dir: storepath.DefaultDir}
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Handshake runs the client side of §2.1.
func (c *Client) Handshake(version uint64) error {
	c.Out.U64(wire.WorkerMagic1)
	c.Out.U64(version)
	if err := c.Out.Flush(); err != nil {
		return fmt.Errorf("client: handshake: %w", err)
	}
	if m := c.In.U64("magic"); c.In.Err() == nil && m != wire.WorkerMagic2 {
		return fmt.Errorf("client: handshake: bad daemon magic %#x", m)
	}
	dv := c.In.U64("daemon version")
	if err := c.In.Err(); err != nil {
		return fmt.Errorf("client: handshake: %w", err)
	}
	c.Minor = min(dv&0xff, version&0xff)
	if c.Minor >= 38 {
		c.Out.Strings(nil)
		c.Out.Flush()
		c.In.Strings("daemon features", wire.MaxSmallString)
	}
	if c.Minor >= 14 {
		c.Out.U64(0)
	}
	if c.Minor >= 11 {
		c.Out.U64(0)
	}
	if err := c.Out.Flush(); err != nil {
		return fmt.Errorf("client: handshake: %w", err)
	}
	if c.Minor >= 33 {
		c.Version = c.In.String("version", wire.MaxSmallString)
	}
	if c.Minor >= 35 {
		c.Trust = c.In.U64("trust")
	}
	if err := c.In.Err(); err != nil {
		return fmt.Errorf("client: handshake: %w", err)
	}
	return c.ProcessStderr()
}

// ProcessStderr reads logger messages up to STDERR_LAST (nil) or
// STDERR_ERROR (a *RemoteError).
func (c *Client) ProcessStderr() error {
	for {
		tag := c.In.U64("stderr tag")
		if err := c.In.Err(); err != nil {
			return fmt.Errorf("client: reading stderr: %w", err)
		}
		if done, err := c.stderrMessage(tag); done {
			return err
		}
	}
}

// stderrMessage handles one logger message whose tag has been read; done
// is true for STDERR_LAST (err nil), STDERR_ERROR and a malformed stream.
func (c *Client) stderrMessage(tag uint64) (done bool, err error) {
	switch tag {
	case wire.StderrLast:
		return true, nil
	case wire.StderrError:
		return true, c.readError()
	case wire.StderrNext:
		line := c.In.String("log line", wire.MaxStringLen)
		if c.Logs != nil {
			c.Logs(line)
		}
	case wire.StderrStartActivity:
		c.In.U64("id")
		lvl := c.In.U64("level")
		typ := c.In.U64("type")
		text := c.In.String("text", wire.MaxStringLen)
		if c.Activities != nil && c.In.Err() == nil {
			c.Activities(lvl, typ, text)
		}
		c.readFields()
		c.In.U64("parent")
	case wire.StderrStopActivity:
		c.In.U64("id")
	case wire.StderrResult:
		c.In.U64("id")
		c.In.U64("type")
		c.readFields()
	case wire.StderrRead:
		n := c.In.U64("len")
		buf := make([]byte, min(n, 1<<20))
		var k int
		if c.ReadSource != nil {
			k, _ = io.ReadFull(c.ReadSource, buf)
		}
		c.Out.Bytes(buf[:k])
		if err := c.Out.Flush(); err != nil {
			return true, err
		}
	case wire.StderrWrite:
		b := c.In.Bytes("data", wire.MaxStringLen)
		if c.WriteSink != nil {
			c.WriteSink.Write(b)
		}
	default:
		return true, fmt.Errorf("client: unknown stderr tag %#x", tag)
	}
	if err := c.In.Err(); err != nil {
		return true, fmt.Errorf("client: reading stderr: %w", err)
	}
	return false, nil
}

func (c *Client) readFields() {
	n := c.In.Count("fields")
	for i := 0; i < n && c.In.Err() == nil; i++ {
		if c.In.U64("field type") == 1 {
			c.In.String("field", wire.MaxStringLen)
		} else {
			c.In.U64("field")
		}
	}
}

func (c *Client) readError() error {
	if c.Minor >= 26 {
		c.In.String("type", 64)
		c.In.U64("level")
		c.In.String("name", 64)
		msg := c.In.String("msg", wire.MaxStringLen)
		c.In.U64("havePos")
		n := c.In.Count("traces")
		for i := 0; i < n; i++ {
			c.In.U64("havePos")
			c.In.String("trace", wire.MaxStringLen)
		}
		if err := c.In.Err(); err != nil {
			return err
		}
		return &RemoteError{Msg: msg}
	}
	msg := c.In.String("msg", wire.MaxStringLen)
	status := c.In.U64("status")
	if err := c.In.Err(); err != nil {
		return err
	}
	return &RemoteError{Msg: msg, Status: status}
}

// Do sends op with its arguments, processes stderr, and reads the reply.
// Either function may be nil.
func (c *Client) Do(op uint64, args func(*wire.Encoder), reply func(*wire.Decoder)) error {
	c.Out.U64(op)
	if args != nil {
		args(c.Out)
	}
	if err := c.Out.Flush(); err != nil {
		return fmt.Errorf("client: op %d: %w", op, err)
	}
	if err := c.ProcessStderr(); err != nil {
		return err
	}
	if reply != nil {
		reply(c.In)
	}
	if err := c.In.Err(); err != nil {
		return fmt.Errorf("client: op %d: reply: %w", op, err)
	}
	return nil
}

// SetOptions sends op 19 with Nix 2.8's defaults and the given overrides.
func (c *Client) SetOptions(overrides map[string]string) error {
	verbosity := c.Verbosity
	if verbosity == 0 {
		verbosity = 3
	}
	return c.Do(wire.OpSetOptions, func(e *wire.Encoder) {
		for _, v := range []uint64{0, 0, 0, verbosity, 1, 0, 1, 7, 0, 0, 1, 1} {
			e.U64(v)
		}
		if c.Minor >= 12 {
			e.StringMap(overrides)
		}
	}, nil)
}

// withContext runs op, cut short if ctx ends first: the connection's
// reads and writes then fail (it is unusable afterwards), and the error
// is ctx's.
func (c *Client) withContext(ctx context.Context, op func() error) error {
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	err := op()
	stop()
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("client: %w", cerr)
	}
	return err
}

// IsValidPath asks op 1.
func (c *Client) IsValidPath(ctx context.Context, p storepath.Path) (bool, error) {
	var ok bool
	err := c.withContext(ctx, func() error {
		return c.Do(wire.OpIsValidPath, func(e *wire.Encoder) { e.Path(c.Dir, p) }, func(d *wire.Decoder) { ok = d.Bool("valid") })
	})
	return ok, err
}

// QueryValidPaths asks op 31 (substitute = false).
func (c *Client) QueryValidPaths(ctx context.Context, ps []storepath.Path) ([]storepath.Path, error) {
	var out []storepath.Path
	err := c.withContext(ctx, func() error {
		return c.Do(wire.OpQueryValidPaths, func(e *wire.Encoder) {
			e.Paths(c.Dir, ps)
			if c.Minor >= 27 {
				e.Bool(false)
			}
		}, func(d *wire.Decoder) { out = d.Paths("paths", c.Dir) })
	})
	return out, err
}

// QueryPathInfo asks op 26; a path that is not valid gives an error
// wrapping store.ErrNotValid.
func (c *Client) QueryPathInfo(ctx context.Context, p storepath.Path) (*store.PathInfo, error) {
	var info *store.PathInfo
	valid := true
	err := c.withContext(ctx, func() error {
		return c.Do(wire.OpQueryPathInfo, func(e *wire.Encoder) { e.Path(c.Dir, p) }, func(d *wire.Decoder) {
			if c.Minor >= 17 && !d.Bool("valid") {
				valid = false
				return
			}
			info = &store.PathInfo{Path: p}
			info.Deriver = d.OptPath("deriver", c.Dir)
			h := d.String("narHash", wire.MaxSmallString)
			info.References = d.Paths("references", c.Dir)
			info.RegistrationTime = time.Unix(int64(d.U64("registrationTime")), 0)
			info.NarSize = d.U64("narSize")
			if c.Minor >= 16 {
				info.Ultimate = d.Bool("ultimate")
				info.Sigs = d.Strings("sigs", wire.MaxSmallString)
				info.CA = d.String("ca", wire.MaxSmallString)
			}
			if d.Err() == nil {
				nh, err := hash.ParseAny(h, hash.SHA256)
				if err != nil {
					d.SetErr("narHash", err)
				}
				info.NarHash = nh
			}
		})
	})
	if err != nil {
		return nil, err
	}
	if !valid {
		return nil, fmt.Errorf("client: path '%s': %w", c.Dir.Abs(p), store.ErrNotValid)
	}
	return info, nil
}

// AddToStoreNar sends op 39 with the NAR framed (protocol ≥ 1.23).
func (c *Client) AddToStoreNar(ctx context.Context, info store.PathInfo, nar io.Reader, repair, dontCheckSigs bool) error {
	return c.withContext(ctx, func() error { return c.addToStoreNar(info, nar, repair, dontCheckSigs) })
}

func (c *Client) addToStoreNar(info store.PathInfo, nar io.Reader, repair, dontCheckSigs bool) error {
	if c.Minor < 23 {
		return errors.New("client: AddToStoreNar below protocol 1.23 is not implemented")
	}
	c.Out.U64(wire.OpAddToStoreNar)
	c.WriteValidPathInfo(info, 16)
	c.Out.Bool(repair)
	c.Out.Bool(dontCheckSigs)
	fw := wire.NewFramedWriter(c.Out)
	if _, err := io.Copy(fw, nar); err != nil {
		return fmt.Errorf("client: AddToStoreNar: %w", err)
	}
	fw.Close()
	if err := c.Out.Flush(); err != nil {
		return fmt.Errorf("client: AddToStoreNar: %w", err)
	}
	return c.ProcessStderr()
}

// NarItem is one path of AddMultipleToStore: its info and its NAR.
type NarItem struct {
	Info store.PathInfo
	NAR  []byte
}

// AddMultipleToStore sends op 44 (protocol ≥ 1.32): the items framed as
// count, then ValidPathInfo and NAR per path, as nix copy sends them.
func (c *Client) AddMultipleToStore(ctx context.Context, items []NarItem, repair, dontCheckSigs bool) error {
	return c.withContext(ctx, func() error { return c.addMultipleToStore(items, repair, dontCheckSigs) })
}

func (c *Client) addMultipleToStore(items []NarItem, repair, dontCheckSigs bool) error {
	if c.Minor < 32 {
		return errors.New("client: AddMultipleToStore needs protocol 1.32")
	}
	c.Out.U64(wire.OpAddMultipleToStore)
	c.Out.Bool(repair)
	c.Out.Bool(dontCheckSigs)
	// Items are encoded into a buffer that is sent as frames of up to
	// 32 KiB, as Nix's client does.
	var buf bytes.Buffer
	fw := wire.NewFramedWriter(c.Out)
	send := func(all bool) error {
		for buf.Len() >= 32<<10 || (all && buf.Len() > 0) {
			if _, err := fw.Write(buf.Next(32 << 10)); err != nil {
				return err
			}
		}
		return nil
	}
	enc := wire.NewEncoder(&buf)
	enc.U64(uint64(len(items)))
	for _, it := range items {
		writeValidPathInfo(enc, c.Dir, it.Info, 16)
		enc.Write(it.NAR)
		if err := enc.Flush(); err != nil {
			return fmt.Errorf("client: AddMultipleToStore: %w", err)
		}
		if err := send(false); err != nil {
			return fmt.Errorf("client: AddMultipleToStore: %w", err)
		}
	}
	if err := send(true); err != nil {
		return fmt.Errorf("client: AddMultipleToStore: %w", err)
	}
	fw.Close()
	if err := c.Out.Flush(); err != nil {
		return fmt.Errorf("client: AddMultipleToStore: %w", err)
	}
	return c.ProcessStderr()
}

// WriteValidPathInfo writes a keyed ValidPathInfo in the layout of minor.
func (c *Client) WriteValidPathInfo(info store.PathInfo, minor uint64) {
	writeValidPathInfo(c.Out, c.Dir, info, minor)
}

func writeValidPathInfo(e *wire.Encoder, dir storepath.Dir, info store.PathInfo, minor uint64) {
	e.Path(dir, info.Path)
	e.OptPath(dir, info.Deriver)
	e.String(info.NarHash.Base16())
	e.Paths(dir, info.References)
	e.U64(0)
	e.U64(info.NarSize)
	if minor >= 16 {
		e.Bool(info.Ultimate)
		e.StringSet(info.Sigs)
		e.String(info.CA)
	}
}

// QueryPathInfoRequest returns op 26 for p, encoded, for
// QueryPathInfoValid: a load generator encodes its requests once.
func (c *Client) QueryPathInfoRequest(p storepath.Path) []byte {
	abs := c.Dir.Abs(p)
	b := binary.LittleEndian.AppendUint64(nil, wire.OpQueryPathInfo)
	b = binary.LittleEndian.AppendUint64(b, uint64(len(abs)))
	b = append(b, abs...)
	for len(b)%8 != 0 {
		b = append(b, 0)
	}
	return b
}

// QueryPathInfoValid sends req (from QueryPathInfoRequest) and checks that
// the reply is a well-formed answer saying the path is valid (protocol ≥
// 1.17): STDERR_LAST (after any log messages), the valid flag, then each
// field of the info with a length within the protocol limits and a 64-digit
// base-16 NAR hash. The fields are skipped, not decoded, and nothing is
// allocated: this is the light client of the benchmark's load generator.
// A path that is not valid gives an error wrapping store.ErrNotValid.
func (c *Client) QueryPathInfoValid(req []byte) error {
	if c.Minor < 17 {
		return fmt.Errorf("client: QueryPathInfoValid needs protocol 1.17, have 1.%d", c.Minor)
	}
	if _, err := c.conn.Write(req); err != nil {
		return fmt.Errorf("client: op %d: %w", wire.OpQueryPathInfo, err)
	}
	for {
		tag, err := c.u64()
		if err != nil {
			return fmt.Errorf("client: reading stderr: %w", err)
		}
		if tag == wire.StderrLast {
			break
		}
		if done, err := c.stderrMessage(tag); done {
			if err == nil {
				break
			}
			return err
		}
	}
	if err := c.skipPathInfo(); err != nil {
		return fmt.Errorf("client: op %d: reply: %w", wire.OpQueryPathInfo, err)
	}
	return nil
}

// skipPathInfo reads the reply of op 26 (protocol ≥ 1.17) without keeping
// it; see QueryPathInfoValid.
func (c *Client) skipPathInfo() error {
	valid, err := c.u64()
	if err != nil {
		return err
	}
	switch valid {
	case 0:
		return store.ErrNotValid
	case 1:
	default:
		return fmt.Errorf("valid flag %d", valid)
	}
	if _, err := c.skipString("deriver", wire.MaxPathLen); err != nil {
		return err
	}
	if n, err := c.skipString("narHash", wire.MaxSmallString); err != nil {
		return err
	} else if n != 64 {
		return fmt.Errorf("narHash: %d characters, want 64", n)
	}
	if err := c.skipStrings("references", 1, wire.MaxPathLen); err != nil {
		return err
	}
	for _, f := range []string{"registrationTime", "narSize", "ultimate"} {
		if _, err := c.u64(); err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
	}
	if err := c.skipStrings("sigs", 0, wire.MaxSmallString); err != nil {
		return err
	}
	_, err = c.skipString("ca", wire.MaxSmallString)
	return err
}

// u64 reads a u64 from the buffered stream without allocating.
func (c *Client) u64() (uint64, error) {
	b, err := c.br.Peek(8)
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, err
	}
	v := binary.LittleEndian.Uint64(b)
	c.br.Discard(8)
	return v, nil
}

// skipString skips a padded string of at most max bytes; it returns the
// string's length.
func (c *Client) skipString(field string, max int) (int, error) {
	n, err := c.u64()
	if err != nil {
		return 0, fmt.Errorf("%s: %w", field, err)
	}
	if n > uint64(max) {
		return 0, fmt.Errorf("%s: %w: %d bytes, limit %d", field, wire.ErrLimit, n, max)
	}
	padded := int(n+7) &^ 7
	if k, err := c.br.Discard(padded); err != nil {
		if err == io.EOF && k < padded {
			err = io.ErrUnexpectedEOF
		}
		return 0, fmt.Errorf("%s: %w", field, err)
	}
	return int(n), nil
}

// skipStrings skips a list of strings of min to max bytes each.
func (c *Client) skipStrings(field string, minLen, max int) error {
	n, err := c.u64()
	if err != nil {
		return fmt.Errorf("%s: %w", field, err)
	}
	if n > wire.MaxListLen {
		return fmt.Errorf("%s: %w: %d elements, limit %d", field, wire.ErrLimit, n, wire.MaxListLen)
	}
	for range n {
		k, err := c.skipString(field, max)
		if err != nil {
			return err
		}
		if k < minLen {
			return fmt.Errorf("%s: empty element", field)
		}
	}
	return nil
}
