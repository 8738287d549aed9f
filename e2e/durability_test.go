package e2e

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

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
// /sys/fs/ext4.
func TestDurableNextToOtherJobsData(t *testing.T) {
	if useStock {
		t.Skip("nixyard's durability policy: nix-daemon does not sync added paths")
	}
	t.Parallel()
	for _, tool := range []string{"mkfs.ext4", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: %v", tool, err)
		}
	}
	e := newEnv(t)
	root := filepath.Join(e.dir, "root")
	dev := mountScratchExt4(t, filepath.Join(e.dir, "fs.img"), root, 1<<30)

	// The other job's data: written, never synced.
	const foreign = 320 << 20
	other := filepath.Join(root, "other-job-output")
	writeUnsynced(t, other, foreign)
	t.Cleanup(func() { os.Remove(other) }) // dropped unwritten: the unmount does not write it
	if dirty := meminfoDirty(t); dirty < foreign*3/4 {
		t.Skipf("only %d MB dirty after writing %d MB: the kernel writes back early here", dirty>>20, foreign>>20)
	}

	d := e.startDaemon(t, withDaemonArgs("--log-level", "debug"))
	before := sessionWriteKB(t, dev)
	src := e.mkTree(t, "src", tree{"bin/": "", "bin/tool": "*#!/bin/sh\necho tool\n", "share/data": "data "})
	p := oneLine(t, "nix-store --add", d.nixStore(t, "--add", src))
	written := sessionWriteKB(t, dev) - before

	log, err := os.ReadFile(d.logPath)
	if err != nil {
		t.Fatal(err)
	}
	way := durableWay(string(log))
	if way != "fsync" {
		t.Errorf("with %d MB of another job's data dirty, the path was made durable by %q, want fsync", foreign>>20, way)
	}
	// A syncfs would have written the other job's 320 MB first.
	if written >= foreign>>10/2 {
		t.Errorf("%d MB were written to the file system while adding a small path: the other job's data was written back", written>>10)
	}
	if !d.isValid(t, p) {
		t.Errorf("%s is not valid after nix-store --add", p)
	}
	if got, err := os.ReadFile(filepath.Join(d.realPath(p), "share/data")); err != nil || !bytes.Equal(got, []byte("data "+e.nonce+"\n")) {
		t.Errorf("share/data in the store: %q, %v", got, err)
	}
	assertVerifyClean(t, d.nixStoreRun(t, "--verify", "--check-contents"))
}

// durableWay returns how the last "made paths durable" line of a daemon
// log says the paths were made durable ("syncfs" or "fsync"), or "" if
// there is none.
func durableWay(log string) string {
	way := ""
	sc := bufio.NewScanner(strings.NewReader(log))
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(line, "made paths durable") {
			continue
		}
		for _, f := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(f, "by="); ok {
				way = v
			}
		}
	}
	return way
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
	for _, argv := range [][]string{
		{"mkfs.ext4", "-q", "-F", image},
		{"mount", "-o", "loop", image, dir},
	} {
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			t.Skipf("%s: %v: %s", strings.Join(argv, " "), err, out)
		}
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
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

// writeUnsynced writes n bytes of random data to path, without syncing.
func writeUnsynced(t *testing.T, path string, n int) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	block := make([]byte, 1<<20)
	for written := 0; written < n; written += len(block) {
		if _, err := rand.Read(block); err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(block); err != nil {
			t.Fatal(err)
		}
	}
}

// meminfoDirty returns the bytes of page cache dirty or under writeback.
func meminfoDirty(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && (f[0] == "Dirty:" || f[0] == "Writeback:") {
			kb, err := strconv.Atoi(f[1])
			if err != nil {
				t.Fatalf("/proc/meminfo: %q: %v", line, err)
			}
			total += kb << 10
		}
	}
	return total
}

// sessionWriteKB returns the kilobytes written to the ext4 file system on
// dev since it was mounted.
func sessionWriteKB(t *testing.T, dev string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/fs/ext4", dev, "session_write_kbytes"))
	if err != nil {
		t.Fatal(err)
	}
	kb, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return kb
}
