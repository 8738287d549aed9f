package bench

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// BecomeSubreaper makes orphaned descendants of this process (such as the
// per-connection children of the stock nix-daemon, which start their own
// sessions) re-parent to it instead of to init, so that they can still be
// found by walking the process tree and reaped.
func BecomeSubreaper() error {
	const prSetChildSubreaper = 36
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); errno != 0 {
		return fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", errno)
	}
	return nil
}

// procState returns the parent pid and state letter of pid from /proc.
func procState(pid int) (ppid int, state byte, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// pid (comm) state ppid ...; comm may contain spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+4 > len(b) {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 2 {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	ppid, err = strconv.Atoi(string(f[1]))
	return ppid, f[0][0], err
}

// Descendants lists the live descendants of pid (children first level by
// level), found by walking /proc.
func Descendants(pid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]int{}
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		pp, st, err := procState(p)
		if err != nil || st == 'Z' {
			continue
		}
		children[pp] = append(children[pp], p)
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

func alive(pid int) bool {
	_, st, err := procState(pid)
	return err == nil && st != 'Z'
}

// KillTree stops pid and every descendant: it collects the tree, sends
// SIGTERM to all, waits up to grace for them to exit, then sends SIGKILL to
// what is left (collecting the tree again, since processes may have forked
// meanwhile). Descendants that became our children are reaped. The caller
// reaps pid itself (exec.Cmd.Wait).
func KillTree(pid int, grace time.Duration) error {
	tree := append([]int{pid}, Descendants(pid)...)
	for _, p := range tree {
		syscall.Kill(p, syscall.SIGTERM)
	}
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		left := 0
		for _, p := range tree {
			if alive(p) {
				left++
			}
		}
		if left == 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	seen := map[int]bool{}
	for _, p := range tree {
		seen[p] = true
	}
	for _, p := range Descendants(pid) {
		if !seen[p] {
			tree = append(tree, p)
		}
	}
	var stuck []int
	for _, p := range tree {
		if alive(p) {
			syscall.Kill(p, syscall.SIGKILL)
			stuck = append(stuck, p)
		}
	}
	time.Sleep(50 * time.Millisecond)
	for _, p := range tree[1:] {
		var ws syscall.WaitStatus
		syscall.Wait4(p, &ws, syscall.WNOHANG, nil) // ours only if re-parented to us
	}
	var errs []error
	for _, p := range stuck {
		if alive(p) {
			errs = append(errs, fmt.Errorf("process %d survived SIGKILL", p))
		}
	}
	return errors.Join(errs...)
}

// MachineBusy returns the CPU time all CPUs of the machine have spent
// busy since boot: user, nice, system, irq and softirq time from
// /proc/stat (not idle, iowait, or steal, which is other guests' time on a
// VM), over every process and kernel thread; and the number of CPUs that
// /proc/stat counts.
func MachineBusy() (busy time.Duration, cpus int, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	lines := strings.Split(string(b), "\n")
	f := strings.Fields(lines[0])
	if len(f) < 8 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("/proc/stat: unexpected first line %q", lines[0])
	}
	var ticks uint64
	// user nice system idle iowait irq softirq
	for _, i := range []int{1, 2, 3, 6, 7} {
		v, err := strconv.ParseUint(f[i], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/stat: %q: %w", lines[0], err)
		}
		ticks += v
	}
	for _, l := range lines[1:] {
		if strings.HasPrefix(l, "cpu") {
			cpus++
		}
	}
	return time.Duration(ticks) * time.Second / clockTicks, cpus, nil
}

// clockTicks is USER_HZ, the unit of /proc/stat: 100 on Linux.
const clockTicks = 100
