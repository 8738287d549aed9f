package client

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// TestContextCutsShort: an op whose daemon does not answer ends with its
// context's error once the context ends.
func TestContextCutsShort(t *testing.T) {
	cc, sc := net.Pipe()
	defer sc.Close()
	go func() { // a daemon that reads and never answers
		buf := make([]byte, 4096)
		for {
			if _, err := sc.Read(buf); err != nil {
				return
			}
		}
	}()
	c := New(cc)
	defer c.Close()
	c.Minor = 34
	p, err := storepath.ParseBase("00000000000000000000000000000000-x")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := c.IsValidPath(ctx, p)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("IsValidPath: %v, want the context's error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("IsValidPath did not end with its context")
	}
}
