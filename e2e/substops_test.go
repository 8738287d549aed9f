package e2e

import (
	"bytes"
	"encoding/binary"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/substitute/cachetest"
)

// Worker protocol ops sent on the wire as the Nix 2.8 client would, for
// the ops no nix command sends in these tests.
const (
	opEnsurePath                  = 10
	opQuerySubstitutablePathInfos = 30
	opQueryValidPaths             = 31
	opQuerySubstitutablePaths     = 32
	opBuildPathsWithResults       = 46

	opSyncWithGC            = 13
	opQueryDeriver          = 18
	opQueryPathFromHashPart = 29
	opQueryValidDerivers    = 33
	opExportPath            = 16
	opImportPaths           = 27

	buildStatusSubstituted  = 1
	buildStatusAlreadyValid = 2
)

// call sends what write wrote, reads the log up to STDERR_LAST and fails
// the test on an error.
func (p *protoConn) call(t *testing.T, what string, write func()) {
	t.Helper()
	write()
	if err := p.flush(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if err := p.readStderr(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func (p *protoConn) mustU64(t *testing.T, what string) uint64 {
	t.Helper()
	v, err := p.readU64()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return v
}

func (p *protoConn) mustString(t *testing.T, what string) string {
	t.Helper()
	s, err := p.readString()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return s
}

func (p *protoConn) mustStrings(t *testing.T, what string) []string {
	t.Helper()
	n := p.mustU64(t, what)
	out := make([]string, n)
	for i := range out {
		out[i] = p.mustString(t, what)
	}
	return out
}

// TestSubstituteOps sends QuerySubstitutablePaths,
// QuerySubstitutablePathInfos, QueryValidPaths with substitution,
// EnsurePath and BuildPathsWithResults for paths a cache has, and checks
// the replies and that the paths became valid.
func TestSubstituteOps(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	sec, pub := e.generateKey(t, "subst-ops-1")
	cacheDir, outs, deps := e.cachedFixtures(t, "zstd", sec, "ops-valid", "ops-ensure", "ops-build")
	missing := "/nix/store/" + "00000000000000000000000000000000" + "-not-in-the-cache"
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	d := e.startDaemon(t, withConf("substituters = "+srv.URL, "trusted-public-keys = "+pub))
	p := dialProto(t, d.sock)

	p.call(t, "QuerySubstitutablePaths", func() {
		p.u64(opQuerySubstitutablePaths)
		p.strs([]string{outs[0], deps[0], missing})
	})
	got := p.mustStrings(t, "QuerySubstitutablePaths reply")
	slices.Sort(got)
	want := []string{outs[0], deps[0]}
	slices.Sort(want)
	// nix-daemon asks only caches whose nix-cache-info says WantMassQuery
	// (`nix copy --to file://` does not write it); nixyard asks every
	// cache (see the README's differences).
	if !useStock && !slices.Equal(got, want) {
		t.Errorf("QuerySubstitutablePaths: %q, want %q", got, want)
	}

	// Since 1.22 the paths go as a map from path to content address.
	p.call(t, "QuerySubstitutablePathInfos", func() {
		p.u64(opQuerySubstitutablePathInfos)
		p.u64(2)
		p.str(outs[0])
		p.str("")
		p.str(missing)
		p.str("")
	})
	if n := p.mustU64(t, "QuerySubstitutablePathInfos reply"); n != 1 {
		t.Fatalf("QuerySubstitutablePathInfos: %d infos, want 1 (the missing path has none)", n)
	}
	path := p.mustString(t, "info path")
	deriver := p.mustString(t, "info deriver")
	refs := p.mustStrings(t, "info references")
	downloadSize := p.mustU64(t, "info download size")
	narSize := p.mustU64(t, "info NAR size")
	if path != outs[0] || deriver == "" || !slices.Equal(refs, []string{deps[0]}) || downloadSize == 0 || narSize == 0 {
		t.Errorf("QuerySubstitutablePathInfos: path %s, deriver %q, references %q, sizes %d/%d; want %s with a deriver, references [%s], sizes > 0",
			path, deriver, refs, downloadSize, narSize, outs[0], deps[0])
	}
	if d.isValid(t, outs[0]) {
		t.Fatalf("%s became valid from queries alone", outs[0])
	}

	// QueryValidPaths with substitute=true fetches what it can.
	p.call(t, "QueryValidPaths", func() {
		p.u64(opQueryValidPaths)
		p.strs([]string{outs[0], missing})
		p.u64(1)
	})
	if got := p.mustStrings(t, "QueryValidPaths reply"); !slices.Equal(got, []string{outs[0]}) {
		t.Errorf("QueryValidPaths with substitution: %q, want [%s]", got, outs[0])
	}
	d.assertFixture(t, outs[0], deps[0])

	p.call(t, "EnsurePath", func() {
		p.u64(opEnsurePath)
		p.str(outs[1])
	})
	if v := p.mustU64(t, "EnsurePath reply"); v != 1 {
		t.Errorf("EnsurePath: reply %d, want 1", v)
	}
	d.assertFixture(t, outs[1], deps[1])

	p.call(t, "BuildPathsWithResults", func() {
		p.u64(opBuildPathsWithResults)
		p.strs([]string{outs[2], outs[0]})
		p.u64(0) // normal build mode
	})
	wantStatus := map[string]uint64{outs[2]: buildStatusSubstituted, outs[0]: buildStatusAlreadyValid}
	n := p.mustU64(t, "BuildPathsWithResults reply")
	if n != 2 {
		t.Fatalf("BuildPathsWithResults: %d results, want 2", n)
	}
	for range n {
		what := "BuildPathsWithResults result"
		target := p.mustString(t, what)
		status := p.mustU64(t, what)
		msg := p.mustString(t, what)
		for range 4 { // timesBuilt, isNonDeterministic, startTime, stopTime
			p.mustU64(t, what)
		}
		if outputs := p.mustU64(t, what); outputs != 0 {
			t.Errorf("%s: %d built outputs for an opaque path", target, outputs)
		}
		if want, ok := wantStatus[target]; !ok || status != want {
			t.Errorf("BuildPathsWithResults: %s has status %d (%q), want %d", target, status, msg, want)
		}
	}
	d.assertFixture(t, outs[2], deps[2])
	d.verifyStopped(t)
}

// TestQueryOps sends QueryPathFromHashPart, QueryValidDerivers,
// QueryDeriver (obsolete, still answered) and SyncWithGC on the wire,
// about a path copied into the daemon with its .drv.
func TestQueryOps(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	out, _ := e.buildFixture(t, other, "query-ops")
	drv := oneLine(t, "deriver", e.local(other, "nix-store", "-q", "--deriver", out).ok(t))
	d := e.startDaemon(t)
	d.cmd("nix", "copy", "--no-check-sigs", "--from", directStore(other), "--to", d.url(), out).ok(t)
	// `nix copy DRV` would copy its outputs; the .drv itself goes by export.
	closure := lines(e.local(other, "nix-store", "-qR", drv).ok(t))
	exported := e.local(other, "nix-store", append([]string{"--export"}, closure...)...).ok(t)
	d.client("nix-store", "--import").withStdin([]byte(exported)).ok(t)
	p := dialProto(t, d.sock)

	for hashPart, want := range map[string]string{
		filepath.Base(out)[:32]:            out,
		"00000000000000000000000000000000": "",
	} {
		p.call(t, "QueryPathFromHashPart", func() {
			p.u64(opQueryPathFromHashPart)
			p.str(hashPart)
		})
		if got := p.mustString(t, "QueryPathFromHashPart reply"); got != want {
			t.Errorf("QueryPathFromHashPart %s: %q, want %q", hashPart, got, want)
		}
	}
	p.call(t, "QueryValidDerivers", func() {
		p.u64(opQueryValidDerivers)
		p.str(out)
	})
	if got := p.mustStrings(t, "QueryValidDerivers reply"); !slices.Equal(got, []string{drv}) {
		t.Errorf("QueryValidDerivers %s: %q, want [%s]", out, got, drv)
	}
	p.call(t, "QueryDeriver", func() {
		p.u64(opQueryDeriver)
		p.str(out)
	})
	if got := p.mustString(t, "QueryDeriver reply"); got != drv {
		t.Errorf("QueryDeriver %s: %q, want %q", out, got, drv)
	}
	p.call(t, "SyncWithGC", func() { p.u64(opSyncWithGC) })
	if v := p.mustU64(t, "SyncWithGC reply"); v != 1 {
		t.Errorf("SyncWithGC: reply %d, want 1", v)
	}
}

// TestExportImportOps sends ExportPath and ImportPaths, which clients
// before Nix 2.0's NarFromPath and AddToStoreNar used: a path and its
// reference exported from one daemon are imported into another, with
// their references and deriver.
func TestExportImportOps(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	other := e.otherStore("src")
	out, dep := e.buildFixture(t, other, "export-ops")
	src := e.startDaemon(t)
	src.cmd("nix", "copy", "--no-check-sigs", "--from", directStore(other), "--to", src.url(), out).ok(t)

	// ImportPaths reads nix-store --export's format: each path preceded
	// by 1, the end marked by 0; references before their referrers.
	var stream bytes.Buffer
	c := dialProto(t, src.sock)
	for _, p := range []string{dep, out} {
		c.written = nil
		c.call(t, "ExportPath", func() {
			c.u64(opExportPath)
			c.str(p)
			c.u64(0) // obsolete "sign" flag
		})
		if v := c.mustU64(t, "ExportPath reply"); v != 1 {
			t.Fatalf("ExportPath %s: reply %d, want 1", p, v)
		}
		if len(c.written) == 0 {
			t.Fatalf("ExportPath %s sent no data", p)
		}
		binary.Write(&stream, binary.LittleEndian, uint64(1))
		stream.Write(c.written)
	}
	binary.Write(&stream, binary.LittleEndian, uint64(0))

	dst := newEnv(t).startDaemon(t)
	i := dialProto(t, dst.sock)
	i.source = &stream
	i.call(t, "ImportPaths", func() { i.u64(opImportPaths) })
	if got := i.mustStrings(t, "ImportPaths reply"); !slices.Equal(got, []string{dep, out}) {
		t.Fatalf("ImportPaths: %q, want [%s %s]", got, dep, out)
	}
	if stream.Len() != 0 {
		t.Errorf("ImportPaths left %d bytes of the stream unread", stream.Len())
	}
	for _, q := range [][]string{{"--hash", out}, {"--references", out}, {"--deriver", out}, {"--hash", dep}} {
		if got, want := dst.nixStore(t, append([]string{"-q"}, q...)...), src.nixStore(t, append([]string{"-q"}, q...)...); got != want {
			t.Errorf("nix-store -q %s: %q after the import, %q at the source", strings.Join(q, " "), got, want)
		}
	}
	dst.verifyStopped(t)
}
