package timerslack

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestWiden(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before := threadSlack(t, fmt.Sprintf("/proc/%d/timerslack_ns", unix.Gettid()))
	if err := Widen(Daemon); errors.Is(err, os.ErrPermission) {
		t.Skipf("no CAP_SYS_NICE: %v", err)
	} else if err != nil {
		t.Fatal(err)
	}
	if got := Inherited(); got != before {
		t.Errorf("Inherited() = %d, want %d", got, before)
	}
	// A thread made afterwards: a goroutine locked to its thread and kept
	// there makes the runtime start others.
	done := make(chan struct{})
	defer close(done)
	for range 4 {
		go func() {
			runtime.LockOSThread()
			<-done
		}()
	}
	runtime.Gosched()
	tids, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, tid := range tids {
		if got := threadSlack(t, "/proc/"+tid.Name()+"/timerslack_ns"); got != Daemon {
			t.Errorf("thread %s: %d ns, want %d", tid.Name(), got, Daemon)
		}
	}
}

func threadSlack(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return v
}
