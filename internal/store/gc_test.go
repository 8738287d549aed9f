package store

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"golang.org/x/sys/unix"
)

// addText adds a text file with references (as a Text path).
func addText(t *testing.T, s *Store, name, content string, refs ...storepath.Path) storepath.Path {
	t.Helper()
	info, err := s.AddToStoreContent(context.Background(), name, contentaddress.Text, hash.SHA256, refs, strings.NewReader(content), false)
	if err != nil {
		t.Fatal(err)
	}
	return info.Path
}

func TestGCRoots(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	state := filepath.Join(root, "nix/var/nix")
	abs := func(p storepath.Path) string { return s.Dir().Abs(p) }

	libA := addText(t, s, "lib-a", "a")
	byLink := addText(t, s, "by-link", "uses a", libA)
	byProfile := addText(t, s, "by-profile", "p")
	byIndirect := addText(t, s, "by-indirect", "i")
	bySession := addText(t, s, "by-session", "s")
	byOther := addText(t, s, "by-other-process", "o")
	garbage := addText(t, s, "garbage", "g")
	garbageRef := addText(t, s, "garbage-user", "gu", garbage)

	os.MkdirAll(filepath.Join(state, "gcroots/x"), 0o755)
	os.Symlink(abs(byLink), filepath.Join(state, "gcroots/x/link"))
	os.Symlink(abs(byProfile), filepath.Join(state, "profiles/default-1-link"))
	os.Symlink("default-1-link", filepath.Join(state, "profiles/default"))
	outside := filepath.Join(t.TempDir(), "result")
	if got, err := s.AddPermRoot(ctx, byIndirect, outside); err != nil || got != outside {
		t.Fatal(got, err)
	}
	// A stale indirect root is removed.
	gone := filepath.Join(t.TempDir(), "gone")
	if err := s.AddIndirectRoot(ctx, gone); err != nil {
		t.Fatal(err)
	}
	ss := s.OpenSession()
	defer ss.Close()
	if err := ss.AddTempRoot(ctx, bySession); err != nil {
		t.Fatal(err)
	}
	// Another process holding its temporary roots file.
	trFile := filepath.Join(state, "temproots", "999999")
	os.WriteFile(trFile, []byte(abs(byOther)+"\x00"), 0o644)
	// flock -o: the flock process itself holds the lock, not its child.
	holder := exec.Command("flock", "-o", "-x", trFile, "sleep", "60")
	holder.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := holder.Start(); err != nil {
		t.Skip("flock:", err)
	}
	killHolder := func() {
		syscall.Kill(-holder.Process.Pid, syscall.SIGKILL)
		holder.Wait()
	}
	defer killHolder()
	for i := 0; ; i++ {
		f, _ := os.OpenFile(trFile, os.O_RDWR, 0)
		ok, _ := tryLockFD(f, 2 /* LOCK_EX */)
		f.Close()
		if !ok {
			break
		}
		if i > 200 {
			t.Fatal("flock holder did not lock")
		}
		time.Sleep(10 * time.Millisecond)
	}

	var found []string
	roots, err := s.FindRoots(ctx, false, func(m string) { found = append(found, m) })
	if err != nil {
		t.Fatal(err)
	}
	// The stale indirect root is removed, and the caller told as by Nix.
	autoLinks, _ := filepath.Glob(filepath.Join(state, "gcroots", "auto", "*"))
	for _, l := range autoLinks {
		if target, _ := os.Readlink(l); target == gone {
			t.Errorf("stale link %s was not removed", l)
		}
	}
	if len(found) != 1 || !strings.HasPrefix(found[0], "removing stale link from '"+filepath.Join(state, "gcroots", "auto")+"/") || !strings.HasSuffix(found[0], "' to '"+gone+"'") {
		t.Errorf("logged %q, want the stale link's removal", found)
	}
	for _, p := range []storepath.Path{byLink, byProfile, byIndirect, bySession, byOther} {
		if len(roots[p]) == 0 {
			t.Errorf("%s is not a root: %v", p, roots)
		}
	}
	if c, _ := s.FindRoots(ctx, true, nil); !slices.Equal(c[bySession], []string{censored}) || c[byLink][0] != filepath.Join(state, "gcroots/x/link") {
		t.Errorf("censored roots: %v", c)
	}

	// DeleteSpecific of a live path is refused, the path highlighted as
	// Nix's hintfmt does.
	_, err = s.CollectGarbage(ctx, GCOptions{Action: GCDeleteSpecific, Paths: []storepath.Path{libA}}, nil)
	if err == nil || !strings.Contains(err.Error(), "Cannot delete path '\x1b[35;1m"+abs(libA)+"\x1b[0m' since it is still alive") {
		t.Errorf("delete live: %v", err)
	}
	dead, err := s.CollectGarbage(ctx, GCOptions{Action: GCReturnDead, MaxFreed: math.MaxUint64}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(dead.Paths, []string{abs(garbage), abs(garbageRef)}) && !slices.Equal(dead.Paths, []string{abs(garbageRef), abs(garbage)}) {
		t.Errorf("dead = %v", dead.Paths)
	}
	var logged []string
	res, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, func(m string) { logged = append(logged, m) })
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(dead.Paths)
	if !slices.Equal(res.Paths, dead.Paths) || res.BytesFreed == 0 {
		t.Errorf("deleted %v (%d bytes), want %v", res.Paths, res.BytesFreed, dead.Paths)
	}
	if !slices.Contains(logged, fmt.Sprintf("deleting '%s'", abs(garbage))) {
		t.Errorf("log: %v", logged)
	}
	// Referrer deleted before its reference.
	if slices.Index(logged, fmt.Sprintf("deleting '%s'", abs(garbageRef))) > slices.Index(logged, fmt.Sprintf("deleting '%s'", abs(garbage))) {
		t.Errorf("reference deleted first: %v", logged)
	}
	if entries, _ := os.ReadDir(filepath.Join(state, "gcroots/auto")); len(entries) != 1 {
		t.Errorf("gcroots/auto: %d entries, want the live one only", len(entries))
	}
	for _, p := range []storepath.Path{libA, byLink, byProfile, byIndirect, bySession, byOther} {
		if ok, _ := s.IsValidPath(ctx, p); !ok {
			t.Errorf("live path %s collected", p)
		}
		if _, err := os.Stat(s.RealPath(p)); err != nil {
			t.Errorf("live path %s gone from disk", p)
		}
	}
	for _, p := range []storepath.Path{garbage, garbageRef} {
		if _, err := os.Lstat(s.RealPath(p)); err == nil {
			t.Errorf("dead path %s still on disk", p)
		}
	}
	// Once the session is closed and the other process gone, their roots go.
	ss.Close()
	killHolder()
	res, err = s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Paths, []string{abs(byOther), abs(bySession)}) && !slices.Equal(res.Paths, []string{abs(bySession), abs(byOther)}) {
		t.Errorf("second GC deleted %v", res.Paths)
	}
	if _, err := os.Stat(trFile); err == nil {
		t.Errorf("stale temproots file not removed")
	}
	nixCmd(t, root, "nix-store", "--verify", "--check-contents")
}

func TestGCMaxFreedAndSpecific(t *testing.T) {
	s, _ := testStore(t)
	ctx := context.Background()
	var ps []storepath.Path
	for i := range 10 {
		ps = append(ps, addText(t, s, "g", strings.Repeat("x", 1000+i)))
	}
	res, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: 0}, nil)
	if err != nil || len(res.Paths) != 0 {
		t.Fatalf("MaxFreed 0 deleted %v (%v)", res.Paths, err)
	}
	res, err = s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: 2500}, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Stops once more than 2500 bytes are freed: after the third path.
	if len(res.Paths) != 3 || res.BytesFreed <= 2500 {
		t.Errorf("MaxFreed: deleted %d paths, %d bytes", len(res.Paths), res.BytesFreed)
	}
	left, _ := s.QueryAllValidPaths(ctx)
	if len(left) != 7 {
		t.Fatalf("%d left", len(left))
	}
	res, err = s.CollectGarbage(ctx, GCOptions{Action: GCDeleteSpecific, Paths: left[:1]}, nil)
	if err != nil || !slices.Equal(res.Paths, []string{s.Dir().Abs(left[0])}) {
		t.Errorf("specific: %v %v", res, err)
	}
}

func TestOptimiseAndVerify(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	big := strings.Repeat("shared content ", 1000)
	var infos []PathInfo
	for i := range 3 {
		infos = append(infos, addNAR(t, s, "opt", map[string]string{"same": big, "own": fmt.Sprint(i)}))
	}
	var freed uint64
	if err := s.OptimiseStore(ctx, OptimiseEvents{Linked: func(b, _ uint64) { freed += b }}); err != nil {
		t.Fatal(err)
	}
	if freed != 2*uint64(len(big)) {
		t.Errorf("freed %d, want %d", freed, 2*len(big))
	}
	var st1, st2 os.FileInfo
	st1, _ = os.Stat(s.RealPath(infos[0].Path) + "/same")
	st2, _ = os.Stat(s.RealPath(infos[2].Path) + "/same")
	if !os.SameFile(st1, st2) {
		t.Error("identical files not linked")
	}
	if errs, err := s.VerifyStore(ctx, true, false, nil, nil); err != nil || errs {
		t.Errorf("verify after optimise: %v %v", errs, err)
	}
	nixCmd(t, root, "nix-store", "--verify", "--check-contents")

	// Deleting the paths leaves .links with unused files that GC removes.
	if _, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, nil); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(filepath.Join(s.realDir, ".links")); len(ents) != 0 {
		t.Errorf(".links not emptied: %d", len(ents))
	}
}

func TestVerifyFindsDamage(t *testing.T) {
	s, _ := testStore(t)
	ctx := context.Background()
	info := addNAR(t, s, "v", map[string]string{"f": "original"})
	gone := addText(t, s, "gone", "bye")
	f := s.RealPath(info.Path) + "/f"
	os.Chmod(s.RealPath(info.Path), 0o755)
	os.Chmod(f, 0o644)
	os.WriteFile(f, []byte("modified"), 0o444)
	removeAll(s.RealPath(gone))
	var logged []string
	errs, err := s.VerifyStore(ctx, true, false, nil, func(l LogLevel, m string) { logged = append(logged, fmt.Sprintf("%d %s", l, m)) })
	if err != nil || !errs {
		t.Fatalf("verify: %v %v", errs, err)
	}
	// At Nix's levels: the news at info, what is wrong at error.
	all := strings.Join(logged, "\n")
	for _, want := range []string{
		fmt.Sprintf("%d reading the Nix store...", LogInfo),
		fmt.Sprintf("%d checking contents of '%s'", LogTalkative, s.Dir().Abs(info.Path)),
		fmt.Sprintf("%d path '%s' was modified! expected hash '%s'", LogError, s.Dir().Abs(info.Path), info.NarHash),
	} {
		if !strings.Contains(all, want) {
			t.Errorf("log lacks %q:\n%s", want, all)
		}
	}
	if ok, _ := s.IsValidPath(ctx, gone); ok {
		t.Error("vanished path still valid")
	}

	// A chain whose two lower paths vanished under a present top: neither
	// is invalidated (the middle one stays valid, so the bottom one, which
	// it refers to, must too), and both are handed to repair.
	bottom := addText(t, s, "bottom", "b")
	middle := addText(t, s, "middle", "m", bottom)
	addText(t, s, "top", "t", middle)
	removeAll(s.RealPath(bottom))
	removeAll(s.RealPath(middle))
	var repaired []storepath.Path
	errs, err = s.VerifyStore(ctx, false, true, func(_ context.Context, p storepath.Path) error {
		repaired = append(repaired, p)
		return nil
	}, nil)
	if err != nil || errs {
		t.Fatalf("verify --repair of missing paths: %v %v", errs, err)
	}
	for _, p := range []storepath.Path{bottom, middle} {
		if ok, _ := s.IsValidPath(ctx, p); !ok {
			t.Errorf("%s was invalidated although a valid path refers to it", p)
		}
	}
	// References first, so that a rebuild of one finds its inputs.
	if !slices.Equal(repaired, []storepath.Path{bottom, middle}) {
		t.Errorf("handed to repair: %v, want %v", repaired, []storepath.Path{bottom, middle})
	}
}

// TestRealNixGCRespectsOurRoots runs real nix-store --gc next to an open
// store: our session's temporary root and a path being kept by it survive,
// garbage goes, and our database stays consistent.
func TestRealNixGCRespectsOurRoots(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	kept := addText(t, s, "kept", "k")
	garbage := addText(t, s, "garbage", "g")
	ss := s.OpenSession()
	defer ss.Close()
	if err := ss.AddTempRoot(ctx, kept); err != nil {
		t.Fatal(err)
	}
	nixCmd(t, root, "nix-store", "--gc")
	if ok, _ := s.IsValidPath(ctx, kept); !ok {
		t.Error("real nix GC deleted our temporary root")
	}
	if ok, _ := s.IsValidPath(ctx, garbage); ok {
		t.Error("real nix GC kept garbage")
	}
	if _, err := s.QueryPathInfo(ctx, kept); err != nil {
		t.Error(err)
	}
}

// TestAddTempRootsBatch: roots added together (one of them twice, one
// held already) are written once each to the roots file, which real Nix's
// collector honours, and our own collector honours them; closing the
// session lets them go.
func TestAddTempRootsBatch(t *testing.T) {
	s, root := testStore(t)
	ctx := context.Background()
	a, b, c := addText(t, s, "a", "a"), addText(t, s, "b", "b"), addText(t, s, "c", "c")
	ss := s.OpenSession()
	if err := ss.AddTempRoot(ctx, c); err != nil {
		t.Fatal(err)
	}
	if err := ss.AddTempRoots(ctx, []storepath.Path{a, b, a, c}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(root, "nix/var/nix/temproots", strconv.Itoa(os.Getpid())))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []storepath.Path{a, b, c} {
		if n := strings.Count(string(data), s.abs(p)+"\x00"); n != 1 {
			t.Errorf("%s is %d times in the roots file %q", p, n, data)
		}
	}
	nixCmd(t, root, "nix-store", "--gc")
	if _, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, nil); err != nil {
		t.Fatal(err)
	}
	for _, p := range []storepath.Path{a, b, c} {
		if ok, _ := s.IsValidPath(ctx, p); !ok {
			t.Errorf("%s, a temporary root, was collected", p)
		}
	}
	ss.Close()
	if _, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, nil); err != nil {
		t.Fatal(err)
	}
	for _, p := range []storepath.Path{a, b, c} {
		if ok, _ := s.IsValidPath(ctx, p); ok {
			t.Errorf("%s is still valid once its session closed", p)
		}
	}
}

// TestReservedSpace: the store keeps db/reserved (8 MiB, or the size
// asked for, or none), as Nix does for a collector on a full disk; a
// collection that deletes removes it first and makes it again after.
func TestReservedSpace(t *testing.T) {
	s, root := testStore(t)
	reserved := filepath.Join(root, "nix/var/nix/db/reserved")
	size := func() int64 {
		st, err := os.Stat(reserved)
		if err != nil {
			return -1
		}
		return st.Size()
	}
	if n := size(); n != 8<<20 {
		t.Errorf("reserved: %d bytes, want 8 MiB", n)
	}
	during := int64(-2)
	logged := func(msg string) {
		if msg == "finding garbage collector roots..." {
			during = size()
		}
	}
	if _, err := s.CollectGarbage(t.Context(), GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, logged); err != nil {
		t.Fatal(err)
	}
	if during != -1 || size() != 8<<20 {
		t.Errorf("reserved during the collection: %d bytes (want none), after: %d", during, size())
	}
	s.Close()
	s = openWith(t, root, func(c *Config) { c.ReservedSize = 1 << 20 })
	if n := size(); n != 1<<20 {
		t.Errorf("with 1 MiB asked for: %d bytes", n)
	}
	s.Close()
	os.Remove(reserved)
	s = openWith(t, root, func(c *Config) { c.ReservedSize = -1 })
	defer s.Close()
	if n := size(); n != -1 {
		t.Errorf("with none asked for: %d bytes", n)
	}
}

// TestGCWaitsForGC: a collection that waits for another in this process
// says so, once, as Nix's waiting for gc.lock does, and gives up when its
// context ends.
func TestGCWaitsForGC(t *testing.T) {
	s, _ := testStore(t)
	s.gcSem <- struct{}{} // another collection runs
	ctx, cancel := context.WithCancel(context.Background())
	var msgs []string
	var mu sync.Mutex
	done := make(chan error, 1)
	go func() {
		_, err := s.CollectGarbage(ctx, GCOptions{Action: GCReturnDead}, func(msg string) {
			mu.Lock()
			msgs = append(msgs, msg)
			mu.Unlock()
		})
		done <- err
	}()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		n := len(msgs)
		mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the waiting collection said nothing")
		}
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("a waiting collection whose context ended: %v", err)
	}
	if len(msgs) != 1 || msgs[0] != "waiting for the big garbage collector lock..." {
		t.Errorf("messages %q", msgs)
	}
	<-s.gcSem
	if _, err := s.CollectGarbage(context.Background(), GCOptions{Action: GCReturnDead}, nil); err != nil {
		t.Errorf("a collection after the other ended: %v", err)
	}
}

// TestGCWaitsForRootInDeadClosure: a temporary root added for a path of
// a closure the collector has found dead, while it deletes that closure,
// returns only once the closure is gone; a holder that then finds the
// path valid keeps it. (With Nix's one pending path, the root of a path
// the collector had looked at before returned at once, the path was
// still valid, and it was deleted under its holder.)
func TestGCWaitsForRootInDeadClosure(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts func(a, b storepath.Path) GCOptions
	}{
		// From b: b is looked at first, then its referrer a.
		{"specific", func(a, b storepath.Path) GCOptions {
			return GCOptions{Action: GCDeleteSpecific, Paths: []storepath.Path{b, a}}
		}},
		// All garbage, deleted in batches of several closures.
		{"dead", func(a, b storepath.Path) GCOptions {
			return GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := testStore(t)
			ctx := context.Background()
			b := addText(t, s, "b", "b")
			a := addText(t, s, "a", "a refers to "+s.abs(b), b)
			// Each path is held (by a session of its own) once the
			// collector has found it dead, before it deletes it.
			got := map[storepath.Path]chan bool{a: make(chan bool, 1), b: make(chan bool, 1)}
			var once sync.Once
			hook := func() {
				once.Do(func() {
					for p, ch := range got {
						go func() {
							ss := s.OpenSession()
							t.Cleanup(func() { ss.Close() })
							if err := ss.AddTempRoot(ctx, p); err != nil {
								t.Error(err)
							}
							valid, err := s.IsValidPathFresh(ctx, p)
							if err != nil {
								t.Error(err)
							}
							ch <- valid
						}()
					}
					// Give a root that does not wait the time to return
					// and look.
					time.Sleep(200 * time.Millisecond)
				})
			}
			testHookClosureDead.Store(&hook)
			defer testHookClosureDead.Store(nil)
			if _, err := s.CollectGarbage(ctx, tc.opts(a, b), nil); err != nil {
				t.Fatal(err)
			}
			for p, ch := range got {
				held := <-ch
				if now, _ := s.IsValidPathFresh(ctx, p); held && !now {
					t.Errorf("the holder of a temporary root found %s valid, and the collector deleted it", p)
				}
			}
		})
	}
}

// TestBatchRootsReachNextCollector: roots added together while
// collectors of another process run reach the collector that runs when
// they are written, even if the one that ran when they were first sent
// went away after hearing of some of them (the next one read the roots
// files before those were written).
func TestBatchRootsReachNextCollector(t *testing.T) {
	s, _ := testStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var ps []storepath.Path
	for _, base := range []string{"00000000000000000000000000000000-a", "11111111111111111111111111111111-b", "22222222222222222222222222222222-c"} {
		p, err := storepath.ParseBase(base)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	// Foreign collectors hold gc.lock throughout: the first hears of one
	// root and goes, the second hears of the rest.
	lock, err := os.OpenFile(s.stateFile("gc.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	sock := s.stateFile("gc-socket", "socket")
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	first, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var heard []string // by the second collector
	go func() {
		c, err := first.Accept()
		if err != nil {
			return
		}
		if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
			c.Write([]byte("1"))
		}
		c.Close()
		first.Close()
		os.Remove(sock)
		second, err := net.Listen("unix", sock)
		if err != nil {
			t.Error(err)
			return
		}
		t.Cleanup(func() { second.Close() })
		for {
			c, err := second.Accept()
			if err != nil {
				return
			}
			go func() {
				br := bufio.NewReader(c)
				for {
					l, err := br.ReadString('\n')
					if err != nil {
						return
					}
					mu.Lock()
					heard = append(heard, strings.TrimSuffix(l, "\n"))
					mu.Unlock()
					c.Write([]byte("1"))
				}
			}()
		}
	}()
	ss := s.OpenSession()
	defer ss.Close()
	if err := ss.AddTempRoots(ctx, ps); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, p := range ps {
		if !slices.Contains(heard, s.abs(p)) {
			t.Errorf("the running collector never heard of the root %s (it heard %q)", p, heard)
		}
	}
}

// TestGCLimitDeletesWhatItInvalidates: a collection with a limit that
// stops midway through a dead closure leaves no path invalidated with its
// files still on disk, and counts only the NAR bytes it deleted.
func TestGCLimitDeletesWhatItInvalidates(t *testing.T) {
	ctx := context.Background()
	for i := 0; ; i++ {
		s, _ := testStore(t)
		b := addText(t, s, "b", fmt.Sprintf("b%d", i)+strings.Repeat("x", 1000))
		a := addText(t, s, "a", "a refers to "+s.abs(b), b)
		if b.String() > a.String() {
			continue // with equal last uses, the sweep must meet b first
		}
		res, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: 1, LRU: true}, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []storepath.Path{a, b} {
			valid, _ := s.IsValidPathFresh(ctx, p)
			if _, err := os.Lstat(s.RealPath(p)); !valid && err == nil {
				t.Errorf("%s is not valid but its files are still there", p)
			}
		}
		if len(res.Paths) != 1 {
			t.Errorf("deleted %q, want one path (the limit is one byte)", res.Paths)
		}
		return
	}
}

// TestGCKeepsQueuedPathGivenReferrer: a dead path waiting to be deleted
// that a path added meanwhile refers to is kept, and the collection goes
// on.
func TestGCKeepsQueuedPathGivenReferrer(t *testing.T) {
	s, _ := testStore(t)
	ctx := context.Background()
	b := addText(t, s, "b", "b")
	var y storepath.Path
	var once sync.Once
	hook := func() {
		once.Do(func() {
			info, err := s.AddToStoreContent(ctx, "y", contentaddress.Text, hash.SHA256, []storepath.Path{b}, strings.NewReader("y refers to "+s.abs(b)), false)
			if err != nil {
				t.Errorf("adding a path that refers to a queued one: %v", err)
				return
			}
			y = info.Path
		})
	}
	testHookClosureDead.Store(&hook)
	defer testHookClosureDead.Store(nil)
	if _, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, nil); err != nil {
		t.Fatalf("the collection failed: %v", err)
	}
	if y.IsZero() {
		t.Fatal("the hook did not run")
	}
	if ok, _ := s.IsValidPathFresh(ctx, b); !ok {
		t.Errorf("%s, which %s refers to, was deleted", b, y)
	}
	if _, err := os.Lstat(s.RealPath(b)); err != nil {
		t.Errorf("%s's files: %v", b, err)
	}
}

// TestGCFlushesForWaitingRoot: queued dead paths are deleted at the next
// closure when a root waits for one of them, not only once the batch is
// full or old.
func TestGCFlushesForWaitingRoot(t *testing.T) {
	s, _ := testStore(t)
	ctx := context.Background()
	b := addText(t, s, "b", "b")
	c := s.newCollector(GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, func(string) {})
	c.dead[b] = true
	c.batch, c.batchStart = []storepath.Path{b}, time.Now()
	c.run.pending[b.HashPart()] = true
	if err := c.flushDue(ctx); err != nil || len(c.batch) != 1 {
		t.Fatalf("a fresh batch with no root waiting was flushed: %v", err)
	}
	done := make(chan struct{})
	go func() {
		c.run.addRoots([]storepath.Path{b})
		close(done)
	}()
	for !c.run.hasWaiting() {
		runtime.Gosched()
	}
	if err := c.flushDue(ctx); err != nil {
		t.Fatal(err)
	}
	<-done
	if ok, _ := s.IsValidPathFresh(ctx, b); ok || len(c.batch) != 0 {
		t.Errorf("the batch a root waited for was not deleted (%s valid %v, %d queued)", b, ok, len(c.batch))
	}
}

// TestGCRootAddedBeforeVisit: a temporary root added during a collection,
// for a path the collector has not looked at yet, keeps that path: the
// collector must consult the roots added since it read the roots files.
func TestGCRootAddedBeforeVisit(t *testing.T) {
	s, _ := testStore(t)
	ctx := context.Background()
	a := addText(t, s, "a", "a")
	c := addText(t, s, "c", "c")
	ss := s.OpenSession()
	defer ss.Close()
	var once sync.Once
	hook := func() {
		once.Do(func() {
			// a is found dead and about to be deleted; c not looked at yet.
			if err := ss.AddTempRoot(ctx, c); err != nil {
				t.Error(err)
			}
		})
	}
	testHookClosureDead.Store(&hook)
	defer testHookClosureDead.Store(nil)
	_, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteSpecific, Paths: []storepath.Path{a, c}}, nil)
	if err == nil || !strings.Contains(err.Error(), "still alive") {
		t.Errorf("deleting a path rooted during the collection: err = %v, want 'still alive'", err)
	}
	if ok, _ := s.IsValidPathFresh(ctx, c); !ok {
		t.Errorf("%s, rooted during the collection, was deleted", c)
	}
	if ok, _ := s.IsValidPathFresh(ctx, a); ok {
		t.Errorf("%s, not rooted, is still valid (positive control)", a)
	}
}

// TestGCDuringAdd: a collection that runs while a path's NAR is being
// unpacked (the path not yet valid, no caller holding a root on it)
// leaves it alone: the addition succeeds and the path's files are all
// there.
func TestGCDuringAdd(t *testing.T) {
	s, _ := testStore(t)
	ctx := context.Background()
	data := narOf(t, map[string]string{"a": "first file", "b": "second file"})
	info := caNARInfo(t, s, "gc-during-add", data, nil)
	half, release := make(chan struct{}), make(chan struct{})
	r := io.MultiReader(bytes.NewReader(data[:len(data)/2]), readerFunc(func(p []byte) (int, error) {
		close(half)
		<-release
		return 0, io.EOF
	}), bytes.NewReader(data[len(data)/2:]))
	done := make(chan error, 1)
	go func() { done <- s.AddToStoreNar(ctx, info, r, AddOptions{}) }()
	<-half
	if _, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, nil); err != nil {
		t.Error(err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("adding while a collection ran: %v", err)
	}
	for _, f := range []string{"a", "b"} {
		if _, err := os.Stat(filepath.Join(s.RealPath(info.Path), f)); err != nil {
			t.Errorf("%s of the added path: %v", f, err)
		}
	}
}
