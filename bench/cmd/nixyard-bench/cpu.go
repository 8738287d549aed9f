package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/nixyard/nixyard/bench"
)

// daemonCPU measures a daemon's CPU time, its forked processes' included,
// through a cgroup-v1 cpuacct group of its own. Where there is no such
// hierarchy it measures nothing and says so.
type daemonCPU struct{ g *bench.CPUGroup }

var errNoCPUAcct = errors.New("no cgroup-v1 cpuacct hierarchy to measure CPU time with")

var cpuSeq int

// newDaemonCPU starts measuring d's CPU time.
func newDaemonCPU(d *bench.Daemon) *daemonCPU {
	cpuSeq++
	g, err := bench.NewCPUGroup(fmt.Sprintf("nixyard-bench-%d-%02d", os.Getpid(), cpuSeq))
	if err != nil {
		logf("daemon CPU time not measured: %v", err)
		return &daemonCPU{}
	}
	if err := g.Add(d.PID()); err != nil {
		logf("daemon CPU time not measured: %v", err)
		g.Close()
		return &daemonCPU{}
	}
	return &daemonCPU{g: g}
}

// usage is the daemon's CPU time so far (0 if not measured).
func (c *daemonCPU) usage() time.Duration {
	if c.g == nil {
		return 0
	}
	u, _ := c.g.Usage()
	return u
}

// since returns the daemon's CPU time since the usage before, or an error
// if it is not measured.
func (c *daemonCPU) since(before time.Duration) (time.Duration, error) {
	if c.g == nil {
		return 0, errNoCPUAcct
	}
	now, err := c.g.Usage()
	return now - before, err
}

// close stops measuring.
func (c *daemonCPU) close() error {
	if c.g == nil {
		return nil
	}
	return c.g.Close()
}
