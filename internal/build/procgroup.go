package build

import (
	"os"
	"os/exec"
	"sync"

	"golang.org/x/sys/unix"
)

// procGroup is a started child that leads a process group of its own
// (Setsid): a builder's helper, or the build hook. Killing the group
// kills whatever the child started that stayed in it.
type procGroup struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	reaped bool // the leader was reaped: the group's ID may be another's
}

// kill kills the group, unless its leader was reaped.
func (p *procGroup) kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.reaped {
		unix.Kill(-p.cmd.Process.Pid, unix.SIGKILL)
	}
}

// wait waits for the leader to exit without reaping it (while it is a
// zombie, its PID, the group's ID, cannot be reused), kills what is left
// of the group, and then reaps it.
func (p *procGroup) wait() error {
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, p.cmd.Process.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			break
		}
	}
	p.mu.Lock()
	unix.Kill(-p.cmd.Process.Pid, unix.SIGKILL)
	p.reaped = true
	p.mu.Unlock()
	return p.cmd.Wait()
}

// childFiles are the pipe ends and other files made for a child about
// to start (a builder's helper, or the build hook), so that a start that
// fails halfway closes every one it made. Closing one of them again
// afterwards is harmless.
type childFiles []*os.File

// pipe makes a pipe and keeps both its ends.
func (fs *childFiles) pipe() (r, w *os.File, err error) {
	if r, w, err = os.Pipe(); err == nil {
		*fs = append(*fs, r, w)
	}
	return r, w, err
}

// add keeps f too.
func (fs *childFiles) add(f *os.File) { *fs = append(*fs, f) }

// closeAll closes them all.
func (fs childFiles) closeAll() {
	for _, f := range fs {
		f.Close()
	}
}
