package build

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestProcGroupWait checks that wait kills what the leader left in its
// group, and that a kill after the leader was reaped signals nothing,
// even a new group that took the leader's PID.
func TestProcGroupWait(t *testing.T) {
	cmd := exec.Command("/bin/sh", "-c", "sleep 100 & echo $!")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pid int
	buf := make([]byte, 32)
	n, _ := out.Read(buf)
	if _, err := fmt.Sscan(string(buf[:n]), &pid); err != nil {
		t.Fatalf("reading the background pid: %v", err)
	}
	p := &procGroup{cmd: cmd}
	if err := p.wait(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for running(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("the leader's background child %d outlived wait", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}

	other := exec.Command("/bin/sleep", "100")
	other.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	cmd.Process.Pid = other.Process.Pid // as if the PID had been reused
	p.kill()
	time.Sleep(50 * time.Millisecond)
	var ws unix.WaitStatus
	if wpid, err := unix.Wait4(other.Process.Pid, &ws, unix.WNOHANG, nil); err != nil || wpid != 0 {
		t.Fatalf("kill after the leader was reaped signalled another group (wait4: %d, %v, %v)", wpid, ws, err)
	}
}

// running tells whether pid is a process that has not exited (a zombie
// has: under a test run as a PID namespace's init, nothing reaps it).
func running(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, after, _ := strings.Cut(string(stat), ") ")
	return !strings.HasPrefix(after, "Z")
}
