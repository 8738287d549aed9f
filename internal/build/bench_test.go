package build

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"
)

// BenchmarkSandboxedBuild builds trivial derivations one at a time in the
// sandbox of a chroot store and reports, besides the wall time, the CPU
// time the build took in this process and in its children (the helper and
// the builder) per build: on a shared machine the CPU time is the steadier
// measure.
func BenchmarkSandboxedBuild(b *testing.B) {
	e := newChrootEnv(b)
	var expr strings.Builder
	expr.WriteString("{ all = [\n")
	for i := range b.N {
		fmt.Fprintf(&expr, "  (mk { name = \"bench-%d\"; script = \"echo %d > $out\"; })\n", i, i)
	}
	expr.WriteString("]; }")
	drvs := e.instantiateList(expr.String(), "all")
	bld := e.builder(Config{Sandbox: SandboxOn})
	before := cpuTime(b)
	b.ResetTimer()
	for _, drv := range drvs {
		e.mustBuild(bld, out(drv))
	}
	b.StopTimer()
	used := cpuTime(b) - before
	b.ReportMetric(float64(used.Microseconds())/1000/float64(len(drvs)), "cpu-ms/op")
}

// cpuTime is the user and system time of this process and its waited-for
// children so far.
func cpuTime(tb testing.TB) time.Duration {
	var total time.Duration
	for _, who := range []int{syscall.RUSAGE_SELF, syscall.RUSAGE_CHILDREN} {
		var ru syscall.Rusage
		if err := syscall.Getrusage(who, &ru); err != nil {
			tb.Fatal(err)
		}
		total += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	return total
}
