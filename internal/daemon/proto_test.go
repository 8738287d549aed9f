package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/daemon/client"
	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

func dial(t testing.TB, d *testDaemon, version uint64) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.DialVersion(ctx, d.socket, version, true)
	if err != nil {
		t.Fatalf("dial 1.%d: %v", version&0xff, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// testNAR returns a NAR of one regular file and the CA info that adds it.
func testNAR(t testing.TB, name, contents string) (store.PathInfo, []byte) {
	t.Helper()
	var buf bytes.Buffer
	w := nar.NewWriter(&buf)
	if err := w.WriteHeader(&nar.Header{Type: nar.TypeRegular, Size: int64(len(contents))}); err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, contents)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	h := hash.Sum(hash.SHA256, buf.Bytes())
	ca := contentaddress.CA{Method: contentaddress.NAR, Hash: h}
	p, err := ca.StorePath("/nix/store", name, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	return store.PathInfo{Path: p, NarHash: h, NarSize: uint64(buf.Len()), CA: ca.String()}, buf.Bytes()
}

func TestHandshakeVersions(t *testing.T) {
	d := startDaemon(t, Options{})
	c := dial(t, d, 1<<8|34)
	if c.Minor != 34 || c.Version != nixVersion || c.Trust != 0 {
		t.Errorf("1.34: minor %d version %q trust %d", c.Minor, c.Version, c.Trust)
	}
	c = dial(t, d, 1<<8|38)
	if c.Minor != 37 || c.Trust != 1 {
		t.Errorf("1.38 client: minor %d trust %d, want 37 and trusted (root)", c.Minor, c.Trust)
	}
	c = dial(t, d, 1<<8|21)
	if c.Minor != 21 || c.Version != "" {
		t.Errorf("1.21: minor %d version %q", c.Minor, c.Version)
	}
	// Too old: the refusal arrives as STDERR_ERROR in the old format.
	_, err := client.DialVersion(context.Background(), d.socket, 1<<8|15, false)
	var re *client.RemoteError
	if !errors.As(err, &re) || !strings.Contains(re.Msg, "too old") {
		t.Errorf("1.15: %v", err)
	}
}

func TestOpsAndErrors(t *testing.T) {
	d := startDaemon(t, Options{})
	ctx := context.Background()
	c := dial(t, d, 1<<8|37)
	info, data := testNAR(t, "foo", "hello")
	if err := c.AddToStoreNar(ctx, info, bytes.NewReader(data), false, true); err != nil {
		t.Fatalf("AddToStoreNar: %v", err)
	}
	got, err := c.QueryPathInfo(ctx, info.Path)
	if err != nil || !got.NarHash.Equal(info.NarHash) || got.NarSize != info.NarSize || got.CA != info.CA {
		t.Fatalf("QueryPathInfo: %+v, %v", got, err)
	}
	missing, _ := storepath.ParseBase("00000000000000000000000000000000-missing")
	if _, err := c.QueryPathInfo(ctx, missing); !errors.Is(err, store.ErrNotValid) {
		t.Errorf("QueryPathInfo(missing): %v", err)
	}
	// An error after startWork ends only the op.
	err = c.Do(wire.OpEnsurePath, func(e *wire.Encoder) { e.Path(c.Dir, missing) }, nil)
	if err == nil || !strings.Contains(err.Error(), "path '"+c.Dir.Abs(missing)+"' does not exist and cannot be created") {
		t.Errorf("EnsurePath(missing): %v (want Nix's words)", err)
	}
	// A bad NAR in a framed upload: the error comes after the whole
	// stream, and the connection stays usable.
	bad := info
	bad.Path, _ = storepath.ParseBase("11111111111111111111111111111111-bad")
	bad.NarHash = hash.Sum(hash.SHA256, []byte("other"))
	if err := c.AddToStoreNar(ctx, bad, bytes.NewReader(data), false, true); err == nil {
		t.Errorf("AddToStoreNar with a wrong hash succeeded")
	}
	if ok, err := c.IsValidPath(ctx, info.Path); !ok || err != nil {
		t.Errorf("IsValidPath after a failed op: %v %v", ok, err)
	}
	// BuildPathsWithResults on a valid opaque path: AlreadyValid.
	err = c.Do(wire.OpBuildPathsWithResults, func(e *wire.Encoder) {
		e.Strings([]string{c.Dir.Abs(info.Path)})
		e.U64(0)
	}, func(dd *wire.Decoder) {
		if n := dd.U64("n"); n != 1 {
			t.Errorf("%d results", n)
		}
		dd.String("path", 4096)
		if st := dd.U64("status"); st != statusAlreadyValid {
			t.Errorf("status %d", st)
		}
		dd.String("errorMsg", 4096)
		dd.U64("timesBuilt")
		dd.U64("nondet")
		dd.U64("start")
		dd.U64("stop")
		dd.U64("cpuUser")
		dd.U64("cpuSystem")
		if m := dd.StringMap("builtOutputs", 4096); len(m) != 0 {
			t.Errorf("builtOutputs %v", m)
		}
	})
	if err != nil {
		t.Fatalf("BuildPathsWithResults: %v", err)
	}
	// A missing opaque path without substituters: NoSubstituters (14) in
	// the result, as Nix reports it, not an error of the op.
	err = c.Do(wire.OpBuildPathsWithResults, func(e *wire.Encoder) {
		e.Strings([]string{c.Dir.Abs(missing)})
		e.U64(0)
	}, func(dd *wire.Decoder) {
		dd.U64("n")
		dd.String("path", 4096)
		if st := dd.U64("status"); st != 14 {
			t.Errorf("BuildPathsWithResults(missing): status %d, want 14", st)
		}
		// As nix-daemon's, a path's (a substitution's) message does not
		// start in normal text (a derivation's does): the client
		// highlights the whole error.
		if msg := dd.String("errorMsg", 4096); msg != "path '"+c.Dir.Abs(missing)+"' is required, but there is no substituter that can build it" {
			t.Errorf("BuildPathsWithResults(missing): errorMsg %q", msg)
		}
		dd.U64("timesBuilt")
		dd.U64("nondet")
		dd.U64("start")
		dd.U64("stop")
		dd.U64("cpuUser")
		dd.U64("cpuSystem")
		dd.StringMap("builtOutputs", 4096)
	})
	if err != nil {
		t.Errorf("BuildPathsWithResults(missing): %v", err)
	}
	// A realisation nobody recorded: an empty set. A malformed id: an
	// error that keeps the connection.
	var n uint64
	err = c.Do(wire.OpQueryRealisation, func(e *wire.Encoder) {
		e.String("sha256:0000000000000000000000000000000000000000000000000000000000000000!out")
	}, func(dd *wire.Decoder) { n = dd.U64("realisations") })
	if err != nil || n != 0 {
		t.Errorf("QueryRealisation(unknown) = %d realisations, %v; want none", n, err)
	}
	err = c.Do(wire.OpQueryRealisation, func(e *wire.Encoder) { e.String("sha256:00!out") }, nil)
	if err == nil || !strings.Contains(err.Error(), "invalid derivation output id") {
		t.Errorf("QueryRealisation(malformed): %v", err)
	}
	// An unknown op: error, then the daemon closes the connection.
	err = c.Do(99, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "invalid operation 99") {
		t.Errorf("op 99: %v", err)
	}
	if _, err := c.IsValidPath(ctx, info.Path); err == nil {
		t.Errorf("connection still open after an unknown op")
	}
	// A malformed argument also closes it.
	c = dial(t, d, 1<<8|37)
	err = c.Do(wire.OpIsValidPath, func(e *wire.Encoder) { e.String("/tmp/not-a-store-path") }, nil)
	if err == nil || !strings.Contains(err.Error(), "not in the store directory") {
		t.Errorf("bad path: %v", err)
	}
}

// TestOldClient acts as Nix 2.3 (protocol 1.21): STDERR_READ uploads,
// AddTextToStore, and errors as message + status.
func TestOldClient(t *testing.T) {
	d := startDaemon(t, Options{})
	ctx := context.Background()
	c := dial(t, d, 1<<8|21)
	info, data := testNAR(t, "old", "from nix 2.3")
	c.ReadSource = bytes.NewReader(data)
	err := c.Do(wire.OpAddToStoreNar, func(e *wire.Encoder) {
		c.WriteValidPathInfo(info, 16)
		e.Bool(false)
		e.Bool(true)
	}, nil)
	if err != nil {
		t.Fatalf("AddToStoreNar over STDERR_READ: %v", err)
	}
	if ok, err := c.IsValidPath(ctx, info.Path); !ok || err != nil {
		t.Fatalf("not valid after add: %v", err)
	}
	var p string
	err = c.Do(wire.OpAddTextToStore, func(e *wire.Encoder) {
		e.String("x.txt")
		e.String("some text")
		e.Paths(c.Dir, nil)
	}, func(dd *wire.Decoder) { p = dd.String("path", 4096) })
	if err != nil || !strings.HasSuffix(p, "-x.txt") {
		t.Fatalf("AddTextToStore: %q %v", p, err)
	}
	missing, _ := storepath.ParseBase("00000000000000000000000000000000-missing")
	err = c.Do(wire.OpEnsurePath, func(e *wire.Encoder) { e.Path(c.Dir, missing) }, nil)
	var re *client.RemoteError
	if !errors.As(err, &re) || re.Status != 1 {
		t.Errorf("old-format error: %v", err)
	}
	// Old AddToStore: raw NAR inline, recursive sha256.
	_, data2 := testNAR(t, "x", "inline")
	err = c.Do(wire.OpAddToStore, func(e *wire.Encoder) {
		e.String("inline")
		e.Bool(true)
		e.U64(1)
		e.String("sha256")
		e.Write(data2)
	}, func(dd *wire.Decoder) { p = dd.String("path", 4096) })
	if err != nil || !strings.HasSuffix(p, "-inline") {
		t.Fatalf("old AddToStore: %q %v", p, err)
	}
	if ok, err := c.IsValidPath(ctx, mustParse(t, c.Dir, p)); !ok || err != nil {
		t.Errorf("old AddToStore path not valid: %v", err)
	}
}

func mustParse(t testing.TB, dir storepath.Dir, s string) storepath.Path {
	t.Helper()
	p, err := dir.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestUntrusted(t *testing.T) {
	d := startDaemon(t, Options{TrustedUsers: []string{"nobody-here"}})
	ctx := context.Background()
	c := dial(t, d, 1<<8|37)
	if c.Trust != 2 {
		t.Errorf("trust = %d, want 2", c.Trust)
	}
	info, data := testNAR(t, "unsigned", "no signature")
	info.CA = ""                                                          // input-addressed: needs a signature (a CA path would not)
	err := c.AddToStoreNar(ctx, info, bytes.NewReader(data), false, true) // dontCheckSigs is ignored
	if err == nil {
		t.Errorf("untrusted unsigned AddToStoreNar succeeded")
	}
	// nix copy --no-check-sigs sends AddMultipleToStore: dontCheckSigs is
	// ignored there too.
	multi, multiData := testNAR(t, "unsigned-multi", "no signature either")
	multi.CA = ""
	if err := c.AddMultipleToStore(ctx, []client.NarItem{{Info: multi, NAR: multiData}}, false, true); err == nil {
		t.Errorf("untrusted unsigned AddMultipleToStore succeeded")
	}
	if ok, err := c.IsValidPath(ctx, multi.Path); err != nil || ok {
		t.Errorf("%s valid (%v, %v) after an untrusted unsigned AddMultipleToStore", multi.Path, ok, err)
	}
	// A content-addressed path needs no signature, but an untrusted client
	// cannot say it was built here (ultimate).
	ca, caData := testNAR(t, "claims-ultimate", "built here, it says")
	ca.Ultimate = true
	if err := c.AddToStoreNar(ctx, ca, bytes.NewReader(caData), false, true); err != nil {
		t.Errorf("untrusted AddToStoreNar of a content-addressed path: %v", err)
	} else if got, err := c.QueryPathInfo(ctx, ca.Path); err != nil || got.Ultimate {
		t.Errorf("untrusted AddToStoreNar registered %s as ultimate (%v)", ca.Path, err)
	}
	for _, tc := range []struct {
		name string
		op   uint64
		args func(*wire.Encoder)
		want string
	}{
		{"AddSignatures", wire.OpAddSignatures, func(e *wire.Encoder) { e.Path(c.Dir, info.Path); e.Strings([]string{"k:s"}) }, "not privileged to add signatures"},
		{"VerifyStore repair", wire.OpVerifyStore, func(e *wire.Encoder) { e.Bool(false); e.Bool(true) }, "not privileged to repair"},
		{"GC ignoreLiveness", wire.OpCollectGarbage, func(e *wire.Encoder) {
			e.U64(0)
			e.Paths(c.Dir, nil)
			e.Bool(true)
			e.U64(0)
			e.U64(0)
			e.U64(0)
			e.U64(0)
		}, "ignore liveness"},
		{"AddPermRoot", wire.OpAddPermRoot, func(e *wire.Encoder) { e.Path(c.Dir, info.Path); e.String("/tmp/r") }, "not privileged"},
		{"AddBuildLog", wire.OpAddBuildLog, func(e *wire.Encoder) {
			e.String(info.Path.String())
			fw := wire.NewFramedWriter(e)
			fw.Write([]byte("log"))
			fw.Close()
		}, "not privileged to add logs"},
		{"BuildPaths repair", wire.OpBuildPaths, func(e *wire.Encoder) { e.Strings(nil); e.U64(1) }, "trusted-users"},
		{"RegisterDrvOutput", wire.OpRegisterDrvOutput, func(e *wire.Encoder) {
			e.String(`{"id":"sha256:0000000000000000000000000000000000000000000000000000000000000000!out","outPath":"` + info.Path.String() + `"}`)
		}, "not privileged to register realisations"},
	} {
		err := c.Do(tc.op, tc.args, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	if _, err := c.IsValidPath(ctx, info.Path); err != nil {
		t.Errorf("connection broken after refusals: %v", err)
	}
}

// TestRealisations: RegisterDrvOutput then QueryRealisation, in both wire
// forms; a second realisation of the same output must name the same path.
func TestRealisations(t *testing.T) {
	d := startDaemon(t, Options{})
	ctx := context.Background()
	c := dial(t, d, 1<<8|37)
	info, data := testNAR(t, "realised", "an output")
	if err := c.AddToStoreNar(ctx, info, bytes.NewReader(data), false, true); err != nil {
		t.Fatal(err)
	}
	other, otherData := testNAR(t, "other", "another output")
	if err := c.AddToStoreNar(ctx, other, bytes.NewReader(otherData), false, true); err != nil {
		t.Fatal(err)
	}
	const drvHash = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	register := func(c *client.Client, p storepath.Path, sig string) error {
		return c.Do(wire.OpRegisterDrvOutput, func(e *wire.Encoder) {
			if c.Minor < 31 {
				e.String(drvHash + "!out")
				e.String(p.String())
				return
			}
			e.String(`{"id":"` + drvHash + `!out","outPath":"` + p.String() + `","signatures":["` + sig + `"]}`)
		}, nil)
	}
	if err := register(c, info.Path, "k:one"); err != nil {
		t.Fatalf("RegisterDrvOutput: %v", err)
	}
	if err := register(c, info.Path, "k:two"); err != nil {
		t.Errorf("RegisterDrvOutput again, same path: %v", err)
	}
	if err := register(c, other.Path, "k:three"); err == nil || !strings.Contains(err.Error(), "another one locally") {
		t.Errorf("RegisterDrvOutput of another path for the same output: %v", err)
	}
	var got []string
	err := c.Do(wire.OpQueryRealisation, func(e *wire.Encoder) { e.String(drvHash + "!out") }, func(dd *wire.Decoder) {
		got = dd.Strings("realisations", 1<<16)
	})
	want := `{"dependentRealisations":{},"id":"` + drvHash + `!out","outPath":"` + info.Path.String() + `","signatures":["k:one","k:two"]}`
	if err != nil || len(got) != 1 || got[0] != want {
		t.Errorf("QueryRealisation = %q, %v; want [%s]", got, err, want)
	}
	// Protocol 1.30: the output path alone.
	old := dial(t, d, 1<<8|30)
	err = old.Do(wire.OpQueryRealisation, func(e *wire.Encoder) { e.String(drvHash + "!out") }, func(dd *wire.Decoder) {
		got = dd.Strings("paths", 4096)
	})
	if err != nil || len(got) != 1 || got[0] != c.Dir.Abs(info.Path) {
		t.Errorf("QueryRealisation at 1.30 = %q, %v", got, err)
	}
}

func TestRefusedUser(t *testing.T) {
	d := startDaemon(t, Options{TrustedUsers: []string{}, AllowedUsers: []string{"@no-such-group"}})
	_, err := client.DialVersion(context.Background(), d.socket, 1<<8|34, true)
	if err == nil || !strings.Contains(err.Error(), "is not allowed to connect") {
		t.Errorf("refused user: %v", err)
	}
}

// TestRefusedBuildUser: a peer whose primary group is build-users-group
// is refused even if trusted-users names it (a builder must not reach the
// daemon). The test process's own primary group stands for nixbld.
func TestRefusedBuildUser(t *testing.T) {
	g, err := user.LookupGroupId(strconv.Itoa(os.Getgid()))
	if err != nil {
		t.Skip(err)
	}
	d := startDaemon(t, Options{TrustedUsers: []string{"*"}, AllowedUsers: []string{"*"}, BuildUsersGroup: g.Name})
	_, err = client.DialVersion(context.Background(), d.socket, 1<<8|34, true)
	if err == nil || !strings.Contains(err.Error(), "is a build user") {
		t.Errorf("build user: %v", err)
	}
}

// TestUploadStallAbandoned: an upload that sends nothing for the daemon's
// uploadStall is abandoned, and the lock of the path it was adding goes
// with it: another client adding the same path, which waited for that
// lock, adds it.
func TestUploadStallAbandoned(t *testing.T) {
	d := startDaemon(t, Options{uploadStall: 200 * time.Millisecond})
	ctx := context.Background()
	info, data := testNAR(t, "stalled", strings.Repeat("sent by halves, then nothing ", 1<<15)) // half of it is past the client's buffers
	release := make(chan struct{})
	defer close(release)
	stalled := dial(t, d, 1<<8|34)
	go stalled.AddToStoreNar(ctx, info, io.MultiReader(bytes.NewReader(data[:len(data)/2]), readerFunc(func([]byte) (int, error) {
		<-release
		return 0, io.EOF
	})), false, true)
	// Once the path's lock file is there, the stalled upload holds it.
	lockFile := d.st.RealPath(info.Path) + ".lock"
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(lockFile); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stalled upload never took the path's lock")
		}
	}
	other := dial(t, d, 1<<8|34)
	octx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := other.AddToStoreNar(octx, info, bytes.NewReader(data), false, true); err != nil {
		t.Fatalf("adding the path while another client's upload of it stalled: %v", err)
	}
	if !strings.Contains(d.logs.String(), "upload stalled") {
		t.Errorf("the daemon's log does not say the stalled upload was abandoned:\n%s", d.logs.String())
	}
}

// TestUploadWaitingNotStalled: an upload that waits longer than the
// daemon's uploadStall for its path's lock (held by a build, say) is not
// taken for a stalled one: only the client's silence counts.
func TestUploadWaitingNotStalled(t *testing.T) {
	d := startDaemon(t, Options{uploadStall: 100 * time.Millisecond})
	ctx := context.Background()
	info, data := testNAR(t, "waits", strings.Repeat("waits for its lock ", 1<<14))
	locks, err := d.st.LockOutputs(ctx, []storepath.Path{info.Path})
	if err != nil {
		t.Fatal(err)
	}
	added := make(chan error, 1)
	c := dial(t, d, 1<<8|34)
	go func() { added <- c.AddToStoreNar(ctx, info, bytes.NewReader(data), false, true) }()
	time.Sleep(5 * 100 * time.Millisecond) // the upload waits for the lock meanwhile
	locks.Unlock()
	if err := <-added; err != nil {
		t.Errorf("an upload that waited for its path's lock: %v", err)
	}
}

// readerFunc is a function as an io.Reader.
type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// TestPanicEndsOneConnection: a panic while serving an op ends that
// connection, with an error the daemon logs, and the daemon goes on
// serving the others.
func TestPanicEndsOneConnection(t *testing.T) {
	d := startDaemon(t, Options{beforeOp: func(op uint64) {
		if op == wire.OpQueryPathInfo {
			panic("a bug in an op")
		}
	}})
	ctx := context.Background()
	info, data := testNAR(t, "after-panic", "still served")
	c := dial(t, d, 1<<8|34)
	if err := c.AddToStoreNar(ctx, info, bytes.NewReader(data), false, true); err != nil {
		t.Fatal(err)
	}
	if _, err := c.QueryPathInfo(ctx, info.Path); err == nil {
		t.Fatal("the op that panicked succeeded")
	}
	other := dial(t, d, 1<<8|34)
	if ok, err := other.IsValidPath(ctx, info.Path); err != nil || !ok {
		t.Errorf("another connection after the panic: valid %v, %v", ok, err)
	}
	if !strings.Contains(d.logs.String(), "panic while serving a connection") {
		t.Errorf("the panic is not in the daemon's log:\n%s", d.logs.String())
	}
}

func TestManyClients(t *testing.T) {
	d := startDaemon(t, Options{})
	ctx := context.Background()
	info, data := testNAR(t, "shared", "shared")
	c := dial(t, d, 1<<8|34)
	if err := c.AddToStoreNar(ctx, info, bytes.NewReader(data), false, true); err != nil {
		t.Fatal(err)
	}
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := client.Dial(ctx, d.socket)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			for j := 0; j < 5; j++ {
				if _, err := c.QueryPathInfo(ctx, info.Path); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestCancelClosesConnections(t *testing.T) {
	d := startDaemon(t, Options{})
	c := dial(t, d, 1<<8|34)
	_ = c // left idle: the cleanup cancels Serve, which must return.
}

// sessionPrefix is a valid 1.34 handshake, then SetOptions.
func sessionPrefix() []byte {
	var b bytes.Buffer
	e := wire.NewEncoder(&b)
	e.U64(wire.WorkerMagic1)
	e.U64(1<<8 | 34)
	e.U64(0)
	e.U64(0)
	e.U64(wire.OpSetOptions)
	for _, v := range []uint64{0, 0, 0, 3, 1, 0, 1, 7, 0, 0, 1, 1, 0} {
		e.U64(v)
	}
	e.Flush()
	return b.Bytes()
}

// FuzzSession feeds random bytes as a client session to a Server over a
// real store: it must never panic (a recovered panic is reported as an
// "internal error") and never hang.
func FuzzSession(f *testing.F) {
	prefix := sessionPrefix()
	for _, op := range []uint64{1, 7, 9, 11, 19, 20, 26, 31, 39, 40, 44, 46} {
		var b bytes.Buffer
		e := wire.NewEncoder(&b)
		e.U64(op)
		e.String("/nix/store/00000000000000000000000000000000-x")
		e.U64(0)
		e.U64(1)
		e.Flush()
		f.Add(b.Bytes())
	}
	d := startDaemon(f, Options{Logger: slog.New(slog.DiscardHandler)})
	f.Fuzz(func(t *testing.T, data []byte) {
		in := io.MultiReader(bytes.NewReader(prefix), bytes.NewReader(data))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := d.srv.ServeConn(ctx, in, io.Discard, true)
		if err != nil && strings.Contains(err.Error(), "internal error") {
			t.Fatalf("panic: %v", err)
		}
		if ctx.Err() != nil {
			t.Fatalf("session did not end: %v", fmt.Sprint(err))
		}
	})
}
