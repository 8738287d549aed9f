// Package timerslack widens the timer slack of the daemon's threads.
//
// Go's runtime has a monitor thread (sysmon) that, whenever the process
// has just come out of idleness, sleeps for 20 µs at a time to look for
// threads stuck in system calls. In a daemon that waits for its clients
// and its upstreams thousands of times a second, those wake-ups and their
// context switches were 12–17 % of nixyard's CPU in a `nix copy` and
// 15 % in a substitution (docs/benchmarks.md). The kernel may delay a
// thread's timed sleep by up to its timer slack (50 µs by default); with a
// slack of 1 ms the monitor wakes about 20 times less often, while nothing
// that nixyard times is finer than milliseconds.
//
// The slack is inherited by child processes, so builders must get back
// what the daemon started with: Inherited.
package timerslack

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Daemon is the slack the daemon gives its threads, in nanoseconds.
const Daemon = 1_000_000

// inherited is the slack the process started with (0: not known).
var inherited atomic.Int64

// Inherited returns the timer slack, in nanoseconds, that the process had
// before Widen, for the processes it starts; 0 if Widen has not run.
func Inherited() int { return int(inherited.Load()) }

// Widen sets the timer slack of every thread of the process to ns and
// remembers the slack the calling thread had. Threads created afterwards
// inherit the new slack from the threads that create them. Setting the
// slack of the process's other threads needs CAP_SYS_NICE; without it
// Widen changes nothing and returns an error.
func Widen(ns int) error {
	// The calling thread is the one whose slack is read, and the one whose
	// change is undone if another's cannot be made.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cur, err := unix.PrctlRetInt(unix.PR_GET_TIMERSLACK, 0, 0, 0, 0)
	if err != nil {
		return fmt.Errorf("timer slack: %w", err)
	}
	if err := setAll(ns); err != nil {
		unix.Prctl(unix.PR_SET_TIMERSLACK, uintptr(cur), 0, 0, 0)
		return err
	}
	inherited.CompareAndSwap(0, int64(cur))
	return nil
}

// setAll sets the timer slack of every thread of the process.
func setAll(ns int) error {
	// Threads being created while the first pass runs may copy the old
	// slack from a thread not yet changed: a second pass catches them.
	for range 2 {
		tids, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return fmt.Errorf("timer slack: %w", err)
		}
		for _, t := range tids {
			// timerslack_ns is not in /proc/self/task/TID, but /proc/TID
			// reaches any thread, though only leaders are listed there.
			if err := writeProc("/proc/"+t.Name()+"/timerslack_ns", strconv.Itoa(ns)); err != nil && !errors.Is(err, os.ErrNotExist) { // a thread that has exited
				return fmt.Errorf("timer slack of thread %s: %w", t.Name(), err)
			}
		}
	}
	return nil
}

func writeProc(path, v string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(v)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
