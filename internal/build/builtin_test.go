package build

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

const (
	viewA = "00000000000000000000000000000000-a"
	viewB = "11111111111111111111111111111111-b"
	viewC = "22222222222222222222222222222222-c" // exists on the host, not visible
)

// testView makes a store on the host with paths a, b and c, of which a
// and b are visible.
func testView(t *testing.T) *storeView {
	t.Helper()
	real := t.TempDir()
	for _, p := range []string{viewA + "/dir", viewB, viewC} {
		if err := os.MkdirAll(filepath.Join(real, p), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	links := map[string]string{
		viewA + "/to-b":      "/nix/store/" + viewB,
		viewA + "/rel":       "dir",
		viewA + "/up":        "../" + viewB,
		viewA + "/to-c":      "/nix/store/" + viewC,
		viewA + "/to-host":   "/etc",
		viewA + "/loop":      "loop",
		viewA + "/dotdot":    "../../../../etc",
		viewB + "/back-to-a": "/nix/store/" + viewA + "/dir",
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(real, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(real, viewA, "file"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	v := &storeView{dir: "/nix/store", visible: map[storepath.Path]string{}}
	for _, base := range []string{viewA, viewB} {
		p, err := storepath.ParseBase(base)
		if err != nil {
			t.Fatal(err)
		}
		v.visible[p] = filepath.Join(real, base)
	}
	return v
}

// TestStoreView: paths resolve as in a sandbox that holds only the
// visible store paths.
func TestStoreView(t *testing.T) {
	v := testView(t)
	a, b := "/nix/store/"+viewA, "/nix/store/"+viewB
	for _, tc := range []struct {
		in, want string
		errno    unix.Errno
	}{
		{in: a + "/dir", want: a + "/dir"},
		{in: a + "/to-b", want: b},
		{in: a + "/rel", want: a + "/dir"},
		{in: a + "/up", want: b},
		{in: a + "/to-b/back-to-a", want: a + "/dir"},
		{in: a + "/dir/../file", want: a + "/file"},
		{in: "/nix/store", want: "/nix/store"},
		{in: "/nix/store/" + viewC, errno: unix.ENOENT},
		{in: a + "/to-c", errno: unix.ENOENT},
		{in: a + "/to-host", errno: unix.ENOENT},
		{in: a + "/dotdot", errno: unix.ENOENT},
		{in: "/etc/passwd", errno: unix.ENOENT},
		{in: a + "/loop", errno: unix.ELOOP},
		{in: a + "/file/x", errno: unix.ENOTDIR},
		{in: a + "/missing", errno: unix.ENOENT},
	} {
		got, err := v.resolve(tc.in)
		switch {
		case tc.errno != 0 && !errors.Is(err, tc.errno):
			t.Errorf("resolve(%s) = %q, %v; want %v", tc.in, got, err, tc.errno)
		case tc.errno == 0 && (err != nil || got != tc.want):
			t.Errorf("resolve(%s) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	if _, err := v.readDir(a + "/to-c"); !errnoIs(err, unix.ENOENT) {
		t.Errorf("readDir of an invisible path: %v", err)
	}
	if _, err := v.readFile(a+"/to-host", 1<<20); !errnoIs(err, unix.ENOENT) {
		t.Errorf("readFile of a host file: %v", err)
	}
	if data, err := v.readFile(a+"/file", 1); err != nil || string(data) != "x" {
		t.Errorf("readFile: %q, %v", data, err)
	}
	if _, err := v.readFile(a+"/file", 0); err == nil {
		t.Error("readFile of a file over the limit: no error")
	}
}

func TestParseBuildenvPackages(t *testing.T) {
	pkgs, err := parseBuildenvPackages("true 5 2 /nix/store/x-a /nix/store/x-a-man\nfalse 3 1 /nix/store/y-b")
	if err != nil {
		t.Fatal(err)
	}
	want := []buildenvPackage{{"/nix/store/x-a", true, 5}, {"/nix/store/x-a-man", true, 5}, {"/nix/store/y-b", false, 3}}
	if len(pkgs) != len(want) {
		t.Fatalf("got %v", pkgs)
	}
	for i := range want {
		if pkgs[i] != want[i] {
			t.Errorf("package %d: %+v, want %+v", i, pkgs[i], want[i])
		}
	}
	for _, bad := range []string{"true 5", "true x 1 /p", "true 5 3 /p", "true 5 -1"} {
		if _, err := parseBuildenvPackages(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestReadNetrc(t *testing.T) {
	p := filepath.Join(t.TempDir(), "netrc")
	os.WriteFile(p, []byte("machine cache.example login u1 password p1\ndefault login anon password none\nmachine cache.example login u2 password p2\n"), 0o600)
	n := readNetrc(p)
	if l, ok := n.lookup("cache.example"); !ok || l.user != "u1" || l.password != "p1" {
		t.Errorf("cache.example: %+v, %v", l, ok)
	}
	if l, ok := n.lookup("other"); !ok || l.user != "anon" {
		t.Errorf("default: %+v, %v", l, ok)
	}
	if _, ok := readNetrc(filepath.Join(t.TempDir(), "missing")).lookup("x"); ok {
		t.Error("a missing netrc has logins")
	}
}

// TestMkdirOutput: a symlink planted at the output path (by a build user,
// without the sandbox) is not followed.
func TestMkdirOutput(t *testing.T) {
	dir := t.TempDir()
	elsewhere := filepath.Join(dir, "elsewhere")
	out := filepath.Join(dir, "out")
	if err := os.Symlink(elsewhere, out); err != nil {
		t.Fatal(err)
	}
	if err := mkdirOutput(out); err == nil {
		t.Error("no error")
	}
	if _, err := os.Lstat(elsewhere); err == nil {
		t.Error("the symlink was followed")
	}
}

// TestDownloadStalls: a download that stops sending fails, naming the
// URL, instead of holding its build forever.
func TestDownloadStalls(t *testing.T) {
	defer func(d time.Duration) { stalledDownloadTimeout = d }(stalledDownloadTimeout)
	stalledDownloadTimeout = 200 * time.Millisecond
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("some"))
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	defer srv.Close()
	err := download(context.Background(), nil, netrc{}, srv.URL+"/f", func(r io.Reader) error {
		_, err := io.Copy(io.Discard, r)
		return err
	})
	if err == nil || !strings.Contains(err.Error(), srv.URL+"/f") || !strings.Contains(err.Error(), "no data for") {
		t.Errorf("stalled download: %v", err)
	}
}

// TestBuildenvBounds: directories that link back to themselves, merged
// from two packages, end at the symlink limit (as stat(2) does for Nix);
// an environment over the size bound fails.
func TestBuildenvBounds(t *testing.T) {
	defer func(n int) { maxEnvEntries = n }(maxEnvEntries)
	maxEnvEntries = 1000
	build := func(t *testing.T, files int) error {
		real := t.TempDir()
		v := &storeView{dir: "/nix/store", visible: map[storepath.Path]string{}}
		var pkgs []buildenvPackage
		for _, base := range []string{viewA, viewB} {
			p, _ := storepath.ParseBase(base)
			v.visible[p] = filepath.Join(real, base)
			os.MkdirAll(filepath.Join(real, base, "d"), 0o755)
			os.Symlink(".", filepath.Join(real, base, "d", "x"))
			os.Symlink(".", filepath.Join(real, base, "d", "y"))
			for i := range files {
				os.WriteFile(filepath.Join(real, base, "d", base[:1]+strconv.Itoa(i)), nil, 0o644)
			}
			pkgs = append(pkgs, buildenvPackage{path: "/nix/store/" + base, active: true, priority: 5})
		}
		out, _ := storepath.ParseBase("33333333333333333333333333333333-env")
		v.visible[out] = filepath.Join(real, out.String())
		os.Mkdir(v.visible[out], 0o755)
		e := &envBuilder{ctx: context.Background(), v: v, warn: t.Logf, priorities: map[string]int{}}
		return e.build("/nix/store/"+out.String(), pkgs)
	}
	if err := build(t, 0); !errnoIs(err, unix.ELOOP) {
		t.Errorf("merging looping directories: %v", err)
	}
	if err := build(t, 600); err == nil || !strings.Contains(err.Error(), "more than 1000 files") {
		t.Errorf("an environment over the bound: %v", err)
	}
}

func TestX86Levels(t *testing.T) {
	flags := map[string]bool{}
	for _, f := range strings.Fields("cmov cx8 fpu fxsr mmx sse sse2 cx16 lahf_lm popcnt pni ssse3 sse4_1 sse4_2 avx avx2 f16c fma abm movbe avx512f") {
		flags[f] = true
	}
	if got := strings.Join(x86Levels(flags), " "); got != "x86_64-v1 x86_64-v2 x86_64-v3" {
		t.Errorf("levels: %q", got)
	}
	if got := x86Levels(map[string]bool{"sse2": true}); len(got) != 0 {
		t.Errorf("levels without v1's features: %q", got)
	}
}

// TestFetchurlAsBuildUser: builtin:fetchurl downloads as a build user, not
// as the daemon's root, as Nix's builtin runs in its builder process: the
// host's firewall rules for build users apply to it.
func TestFetchurlAsBuildUser(t *testing.T) {
	e := newChrootEnv(t)
	content := []byte("fetched as a build user\n")
	uids := make(chan int, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		uids <- peerUID(t, r)
		w.Write(content)
	}))
	defer srv.Close()
	drvs := e.instantiate(fmt.Sprintf(`{
  f = builtins.derivation {
    name = "fetched"; builder = "builtin:fetchurl"; system = "builtin";
    url = "%s/f"; outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "%s";
  };
}`, srv.URL, hash.Sum(hash.SHA256, content).Base16()), "f")
	b := e.builder(Config{Sandbox: SandboxOn, BuildUsersGroup: "nixbld"})
	e.mustBuild(b, out(drvs["f"]))
	if uid := <-uids; uid <= 0 {
		t.Errorf("builtin:fetchurl downloaded as uid %d (-1: not found), not as a build user", uid)
	}
}

// peerUID is the uid owning the client end of r's TCP connection, from
// /proc/net/tcp.
func peerUID(t *testing.T, r *http.Request) int {
	_, port, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		t.Error(err)
		return -1
	}
	p, _ := strconv.Atoi(port)
	data, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Error(err)
		return -1
	}
	want := fmt.Sprintf(":%04X", p)
	for _, l := range strings.Split(string(data), "\n")[1:] {
		f := strings.Fields(l)
		if len(f) > 7 && strings.HasSuffix(f[1], want) {
			uid, _ := strconv.Atoi(f[7])
			return uid
		}
	}
	t.Errorf("no socket with local port %d in /proc/net/tcp", p)
	return -1
}

// TestBuiltinSharedTimeout: as TestSharedBuildLimits, for a builtin
// builder: a download that a client with a 1 s timeout started, and that
// another client without one then waits for, runs to its end.
func TestBuiltinSharedTimeout(t *testing.T) {
	e := newChrootEnv(t)
	content := []byte("slow download\n")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(2500 * time.Millisecond)
		w.Write(content)
	}))
	defer srv.Close()
	drvs := e.instantiate(fmt.Sprintf(`{
  f = builtins.derivation {
    name = "slow-fetch"; builder = "builtin:fetchurl"; system = "builtin";
    url = "%s/f"; outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "%s";
  };
}`, srv.URL, hash.Sum(hash.SHA256, content).Base16()), "f")
	b := e.builder(Config{Sandbox: SandboxOn})
	short := make(chan []Result, 1)
	go func() {
		res, _ := b.Build(t.Context(), []store.DerivedPath{out(drvs["f"])}, ClientOptions{Timeout: time.Second}, nil)
		short <- res
	}()
	waitBuilding(t, b, drvs["f"])
	res, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["f"])}, ClientOptions{}, nil)
	if err != nil || !res[0].Status.Success() {
		t.Errorf("the client without a timeout: %+v %v", res, err)
	}
	<-short
}
