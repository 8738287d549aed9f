package e2e

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/pagecache"
	"github.com/nixyard/nixyard/internal/store"
	"golang.org/x/sys/unix"
)

// TestDurableNextToOtherJobsData adds a path through the real client while
// another "job" has left 320 MB of unwritten data on the store's file
// system. nixyard must then make the path durable with fsyncs of its own
// files (not a syncfs, which would write back the other job's data first),
// and the path must be valid and verify.
//
// The store and the other job's data live on an ext4 file system of the
// test's own (a loop mount), so that no other test's syncfs writes that
// data back meanwhile, and so that the bytes written to it can be read from
// /sys/fs/ext4. Not parallel: while the 320 MB are dirty, every other
// nixyard daemon of the suite would take the fsync way too.
func TestDurableNextToOtherJobsData(t *testing.T) {
	if useStock {
		t.Skip("nixyard's durability policy: nix-daemon does not sync added paths")
	}
	const foreign = 320 << 20
	if bg := backgroundWritebackBytes(t); bg < 2*foreign {
		t.Skipf("the kernel starts writing back at %d MB dirty here: too soon for %d MB of another job's data to stay unwritten", bg>>20, foreign>>20)
	}
	e := newEnv(t)
	root := filepath.Join(e.dir, "root")
	dev := mountScratchExt4(t, filepath.Join(e.dir, "fs.img"), root, 1<<30)
	d := e.startDaemon(t, withDaemonArgs("--log-level", "debug"))
	src := e.mkTree(t, "src", tree{"bin/": "", "bin/tool": "*#!/bin/sh\necho tool\n", "share/data": "data "})

	// The other job's data: written, never synced.
	other := filepath.Join(root, "other-job-output")
	kb0 := sessionWriteKB(t, dev)
	if err := pagecache.WriteUnsynced(t.Context(), other, int64(foreign)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(other) })
	kb1 := sessionWriteKB(t, dev)
	p := oneLine(t, "nix-store --add", d.nixStore(t, "--add", src))
	kb2 := sessionWriteKB(t, dev)
	if err := pagecache.SyncFS(root); err != nil {
		t.Fatal(err)
	}
	kb3 := sessionWriteKB(t, dev)
	if early := kb1 - kb0; early > foreign>>10/4 {
		t.Skipf("the kernel wrote back %d MB of the other job's data before the add", early>>10)
	}
	duringAdd, after := kb2-kb1, kb3-kb2
	if duringAdd+after < foreign>>10*3/4 {
		t.Fatalf("only %d MB written during the add and %d MB by a syncfs after it: the other job's %d MB went missing", duringAdd>>10, after>>10, foreign>>20)
	}

	log, err := os.ReadFile(d.logPath)
	if err != nil {
		t.Fatal(err)
	}
	if way := store.LastDurableWay(string(log)); way != "fsync" {
		t.Errorf("with %d MB of another job's data dirty, the path was made durable by %q, want fsync", foreign>>20, way)
	}
	// A syncfs would have written the other job's 320 MB first.
	if duringAdd >= (foreign>>10)/2 {
		t.Errorf("%d MB were written to the file system while adding a small path (and %d MB by a syncfs after it): the other job's data was written back", duringAdd>>10, after>>10)
	}
	if !d.isValid(t, p) {
		t.Errorf("%s is not valid after nix-store --add", p)
	}
	if got, err := os.ReadFile(filepath.Join(d.realPath(p), "share/data")); err != nil || !bytes.Equal(got, []byte("data "+e.nonce+"\n")) {
		t.Errorf("share/data in the store: %q, %v", got, err)
	}
	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))
}

// backgroundWritebackBytes estimates how much dirty data the kernel lets
// accumulate before its flusher starts writing back (vm.dirty_background_*,
// the ratio taken of MemAvailable, or of what the test's cgroup-v2 memory
// limit leaves, if that is less: the kernel then applies the ratio there).
func backgroundWritebackBytes(t *testing.T) int {
	t.Helper()
	if b := readIntFile(t, "/proc/sys/vm/dirty_background_bytes"); b > 0 {
		return b
	}
	mem, err := pagecache.Meminfo("MemAvailable:")
	if err != nil {
		t.Fatal(err)
	}
	avail := int(mem[0])
	if left, ok := cgroupMemoryLeft(); ok {
		avail = min(avail, left)
	}
	return readIntFile(t, "/proc/sys/vm/dirty_background_ratio") * avail / 100
}

// cgroupMemoryLeft returns memory.max minus memory.current of this
// process's cgroup-v2 group, if it has a limit.
func cgroupMemoryLeft() (int, bool) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		rel, ok := strings.CutPrefix(line, "0::")
		if !ok {
			continue
		}
		dir := filepath.Join("/sys/fs/cgroup", rel)
		maxB, err1 := os.ReadFile(filepath.Join(dir, "memory.max"))
		curB, err2 := os.ReadFile(filepath.Join(dir, "memory.current"))
		if err1 != nil || err2 != nil {
			return 0, false
		}
		limit, err1 := strconv.Atoi(strings.TrimSpace(string(maxB))) // "max": no limit
		used, err2 := strconv.Atoi(strings.TrimSpace(string(curB)))
		if err1 != nil || err2 != nil {
			return 0, false
		}
		return max(limit-used, 0), true
	}
	return 0, false
}

// mountScratchExt4 makes an ext4 file system of size bytes in a sparse
// image file and loop-mounts it at dir until the test ends. It returns the
// loop device's name (e.g. "loop3").
func mountScratchExt4(t *testing.T, image, dir string, size int64) string {
	t.Helper()
	f, err := os.Create(image)
	if err != nil {
		t.Fatal(err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	mustMkdir(t, dir, 0o755)
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skipf("no loop devices here: %v", err)
	}
	// Inode tables and journal written now, not by a kernel thread after
	// the mount while the test counts the bytes written.
	for _, argv := range [][]string{
		{"mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", image},
		{"mount", "-o", "loop", image, dir},
	} {
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, out)
		}
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s; detaching it lazily", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	// /sys/dev/block/MAJ:MIN names the device.
	link, err := os.Readlink(fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev)))
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Base(link)
}

// readIntFile reads a file holding one decimal number.
func readIntFile(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return n
}

// sessionWriteKB returns the kilobytes written to the ext4 file system on
// dev since it was mounted.
func sessionWriteKB(t *testing.T, dev string) int {
	t.Helper()
	return readIntFile(t, filepath.Join("/sys/fs/ext4", dev, "session_write_kbytes"))
}

// TestStoreFull: on a store whose file system fills up, an addition or a
// substitution that does not fit fails with the system's reason and
// leaves nothing behind, neither registered nor on disk; the daemon goes
// on serving, and what fits is added. (nix-daemon leaves the partial path
// on disk, and the file system full.)
func TestStoreFull(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon leaves a partly written path on disk, and the file system full")
	}
	e := newEnv(t)
	mountScratchExt4(t, filepath.Join(e.dir, "store.img"), filepath.Join(e.dir, "root"), 48<<20)
	big := make([]byte, 48<<20)
	if _, err := rand.Read(big); err != nil {
		t.Fatal(err)
	}
	src := e.otherStore("src")
	tooBig := oneLine(t, "nix-store --add", e.local(src, "nix-store", "--add", e.file(t, "too-big", string(big))).ok(t))
	cacheDir := filepath.Join(e.dir, "cache")
	e.fillCache(t, src, cacheDir, "none", "", tooBig)
	d := e.startDaemon(t, withConf("substituters = file://"+cacheDir, "require-sigs = false"))

	entries := func() []string {
		names, err := filepath.Glob(filepath.Join(d.root, "nix/store/*"))
		if err != nil {
			t.Fatal(err)
		}
		return names
	}
	before := entries()
	for _, c := range []struct {
		what string
		args []string
	}{
		{"nix-store --add", []string{"--add", e.file(t, "add/too-big", string(big))}},
		{"nix-store -r (substitution)", []string{"-r", tooBig}},
	} {
		r := d.client("nix-store", c.args...).run(t)
		if r.err == nil || !strings.Contains(r.stderr, "no space left on device") {
			t.Errorf("%s of more than the store's file system holds: not refused with the system's reason:\n%s", c.what, r)
		}
		if now := entries(); !slices.Equal(now, before) {
			t.Errorf("%s that did not fit left %v in the store (before: %v)", c.what, now, before)
		}
	}
	small := oneLine(t, "nix-store --add", d.nixStore(t, "--add", e.file(t, "small", "fits "+e.nonce)))
	if !d.isValid(t, small) {
		t.Errorf("%s, added after the failures, is not valid", small)
	}
	d.nixStore(t, "--verify", "--check-contents")
}
