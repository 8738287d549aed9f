package daemon

import (
	"bytes"
	"context"
	"testing"
)

// TestAddedPathsRootedForConnection checks that a path a client adds stays
// alive for as long as that client's connection is open, as with Nix
// (a client adds a .drv, then builds it on the same connection), and
// becomes garbage once the connection closes.
func TestAddedPathsRootedForConnection(t *testing.T) {
	d := startDaemon(t, Options{})
	ctx := context.Background()
	c := dial(t, d, 0x122)
	info, data := testNAR(t, "held-by-connection", "kept while connected")
	if err := c.AddToStoreNar(ctx, info, bytes.NewReader(data), false, true); err != nil {
		t.Fatal(err)
	}
	abs := d.st.Dir().Abs(info.Path)

	d.mustNix(t, "nix-store", "--gc")
	if ok, err := d.st.IsValidPath(ctx, info.Path); err != nil || !ok {
		t.Fatalf("%s collected while the connection that added it is open (valid=%v, err=%v)", abs, ok, err)
	}

	c.Close()
	// The server notices the close asynchronously; the GC's dead list is
	// the observable: wait for the path to become dead, bounded by the test
	// timeout rather than a timed assertion.
	for {
		dead := d.mustNix(t, "nix-store", "--gc", "--print-dead")
		if bytes.Contains([]byte(dead), []byte(abs)) {
			break
		}
		if t.Context().Err() != nil {
			t.Fatal("path never became dead after the connection closed")
		}
	}
	d.mustNix(t, "nix-store", "--delete", abs)
	if ok, _ := d.st.IsValidPath(ctx, info.Path); ok {
		t.Fatalf("%s still valid after the connection closed and it was deleted", abs)
	}
}
