package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/nixyard/nixyard/internal/daemon/wire"
)

// errNoHello ends a connection whose client hung up before saying
// anything: a check of whether a daemon answers (another daemon's start
// makes one), not a failure.
var errNoHello = errors.New("the client hung up before its handshake")

// handshake runs §2.1 and leaves c ready for ops. Errors before the logger
// channel exists close the connection silently (as nix-daemon does); a
// refused peer gets its reason as STDERR_ERROR at step 10.
func (c *conn) handshake(ctx context.Context) error {
	// Step 1: client magic.
	if _, err := c.br.Peek(1); errors.Is(err, io.EOF) {
		return errNoHello
	}
	if magic := c.in.U64("magic"); c.in.Err() != nil {
		return fmt.Errorf("handshake: reading magic: %w", c.in.Err())
	} else if magic != wire.WorkerMagic1 {
		return fmt.Errorf("handshake: protocol mismatch: magic %#x", magic)
	}
	// Step 2: our magic and version, flushed before reading step 3.
	c.out.U64(wire.WorkerMagic2)
	c.out.U64(protocolVersion)
	if err := c.out.Flush(); err != nil {
		return fmt.Errorf("handshake: sending version: %w", err)
	}
	// Step 3: client version.
	clientVersion := c.in.U64("client version")
	if err := c.in.Err(); err != nil {
		return fmt.Errorf("handshake: reading client version: %w", err)
	}
	if clientVersion>>8 != 1 || clientVersion&0xff < 10 {
		return fmt.Errorf("handshake: unsupported client protocol version %d.%d", clientVersion>>8, clientVersion&0xff)
	}
	c.minor = min(clientVersion&0xff, protocolVersion&0xff)
	c.tun = newTunnel(c.out, c.minor)
	c.settings = defaultClientSettings()

	// Steps 4–5: features (1.38 only; we advertise 1.37, so this only
	// runs if that constant is raised). We offer none.
	if c.minor >= 38 {
		c.in.Strings("client features", wire.MaxSmallString)
		if err := c.in.Err(); err != nil {
			return fmt.Errorf("handshake: reading client features: %w", err)
		}
		c.out.Strings(nil)
		if err := c.out.Flush(); err != nil {
			return fmt.Errorf("handshake: sending features: %w", err)
		}
	}
	// Step 6: obsolete CPU affinity.
	if c.minor >= 14 && c.in.Bool("cpu affinity flag") {
		c.in.U64("cpu affinity")
	}
	// Step 7: obsolete reserveSpace.
	if c.minor >= 11 {
		c.in.U64("reserveSpace")
	}
	if err := c.in.Err(); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	// Step 8: our Nix version.
	if c.minor >= 33 {
		c.out.String(nixVersion)
	}
	// Step 9: trust.
	if c.minor >= 35 {
		switch {
		case c.peer.trusted:
			c.out.U64(1)
		default:
			c.out.U64(2)
		}
	}
	// Step 10: startup messages, then LAST or ERROR.
	if err := c.tun.startWork(); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	var refusal error
	switch {
	case c.peer.refused != "":
		refusal = errors.New(c.peer.refused)
	case c.minor < minClientMinor:
		refusal = fmt.Errorf("the Nix client protocol version 1.%d is too old for nixyard (it needs 1.%d, Nix 2.3, or newer)", c.minor, minClientMinor)
	}
	c.tun.stopWork(refusal)
	if err := c.out.Flush(); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	if refusal != nil {
		return fmt.Errorf("handshake: %w", refusal)
	}
	return nil
}
