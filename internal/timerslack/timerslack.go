// Package timerslack widens the timer slack of the daemon's threads.
//
// Go's runtime has a monitor thread (sysmon) that, whenever the process
// has just come out of idleness, sleeps 20 µs at a time while it looks for
// threads stuck in system calls. In a cold substitution its sleeps were
// half of the daemon's context switches and about 15 % of its CPU
// (docs/benchmarks.md). The kernel may stretch a thread's timed sleep by
// up to its timer slack, 50 µs by default; with 1 ms the monitor wakes
// less often, and a substitution got faster. The price is paid by the Go
// runtime's own short waits (a P taken back from a thread stuck in a
// system call, timers) and by nothing of nixyard's: its timeouts are
// milliseconds or more.
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
	"syscall"

	"golang.org/x/sys/unix"
)

// Daemon is the slack the daemon gives its threads, in nanoseconds.
const Daemon = 1_000_000

// inherited is the slack the process started with (0: not known).
var inherited atomic.Int64

// Inherited returns the timer slack, in nanoseconds, that the process had
// before Widen, for the processes it starts; 0 if Widen has not run.
func Inherited() int { return int(inherited.Load()) }

// Widen sets the timer slack of every thread of the process to ns, unless
// it is already that wide, and remembers the slack the calling thread had
// for Inherited. Threads created afterwards inherit the new slack from the
// threads that create them. Setting the slack of the process's other
// threads needs CAP_SYS_NICE; when a thread cannot be changed, Widen puts
// back the slack it started with and returns an error.
func Widen(ns int) error {
	// The calling thread is the one whose slack is read.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cur, err := unix.PrctlRetInt(unix.PR_GET_TIMERSLACK, 0, 0, 0, 0)
	if err != nil {
		return fmt.Errorf("timer slack: %w", err)
	}
	inherited.CompareAndSwap(0, int64(cur))
	if cur >= ns {
		return nil
	}
	changed, err := setAll(ns)
	if err != nil {
		for _, tid := range changed {
			if uerr := setThread(tid, cur); uerr != nil && !exited(uerr) {
				err = errors.Join(err, fmt.Errorf("putting the slack back: %w", uerr))
			}
		}
		return err
	}
	return nil
}

// setAll sets the timer slack of every thread of the process. It returns
// the threads it changed, also when it fails.
func setAll(ns int) ([]string, error) {
	var changed []string
	// Threads being created while the first pass runs may copy the old
	// slack from a thread not yet changed: a second pass catches them.
	for range 2 {
		tids, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return changed, fmt.Errorf("timer slack: %w", err)
		}
		for _, t := range tids {
			if err := setThread(t.Name(), ns); exited(err) {
				continue
			} else if err != nil {
				return changed, err
			}
			changed = append(changed, t.Name())
		}
	}
	return changed, nil
}

// exited reports whether err is setThread's for a thread that has exited.
func exited(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH)
}

// setThread sets the timer slack of thread tid. timerslack_ns is not in
// /proc/self/task/TID, but /proc/TID reaches any thread, though only
// thread group leaders are listed there.
func setThread(tid string, ns int) error {
	if err := writeProc("/proc/"+tid+"/timerslack_ns", strconv.Itoa(ns)); err != nil {
		return fmt.Errorf("timer slack of thread %s: %w", tid, err)
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
