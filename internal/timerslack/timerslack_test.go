package timerslack

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestWiden(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before := readSlack(t, unix.Gettid())
	if before >= Daemon {
		t.Skipf("the test runs with a slack of %d ns already", before)
	}
	t.Cleanup(func() {
		if _, err := setAll(before); err != nil {
			t.Error(err)
		}
		inherited.Store(0)
	})
	if err := Widen(Daemon); errors.Is(err, os.ErrPermission) {
		t.Skipf("no CAP_SYS_NICE: %v", err)
	} else if err != nil {
		t.Fatal(err)
	}
	if got := Inherited(); got != before {
		t.Errorf("Inherited() = %d, want %d", got, before)
	}
	old := threads(t)
	for tid := range old {
		if got := readSlack(t, tid); got != Daemon {
			t.Errorf("thread %d: %d ns, want %d", tid, got, Daemon)
		}
	}

	// A thread made afterwards inherits the slack: goroutines locked to
	// their threads and kept there make the runtime start more.
	done := make(chan struct{})
	defer close(done)
	for range 4 {
		go func() {
			runtime.LockOSThread()
			<-done
		}()
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		fresh := 0
		for tid := range threads(t) {
			if !old[tid] {
				fresh++
				if got := readSlack(t, tid); got != Daemon {
					t.Errorf("new thread %d: %d ns, want %d", tid, got, Daemon)
				}
			}
		}
		if fresh > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no new thread after 10 s")
		}
	}
}

// TestWidenKeepsWider: a process already given a wider slack keeps it.
func TestWidenKeepsWider(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before := readSlack(t, unix.Gettid())
	t.Cleanup(func() {
		unix.Prctl(unix.PR_SET_TIMERSLACK, uintptr(before), 0, 0, 0)
		inherited.Store(0)
	})
	if err := unix.Prctl(unix.PR_SET_TIMERSLACK, 2*Daemon, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := Widen(Daemon); err != nil {
		t.Fatal(err)
	}
	if got := readSlack(t, unix.Gettid()); got != 2*Daemon {
		t.Errorf("slack after Widen(%d): %d ns, want %d kept", Daemon, got, 2*Daemon)
	}
	if got := Inherited(); got != 2*Daemon {
		t.Errorf("Inherited() = %d, want %d", got, 2*Daemon)
	}
}

// threads returns the IDs of the process's threads.
func threads(t *testing.T) map[int]bool {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	tids := map[int]bool{}
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			t.Fatal(err)
		}
		tids[tid] = true
	}
	return tids
}

func readSlack(t *testing.T, tid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/timerslack_ns", tid))
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return v
}
