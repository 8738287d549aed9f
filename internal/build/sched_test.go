package build

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// waitUntil polls cond until it holds (a deadline only bounds a broken
// set-up).
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// poll waits, for at most 30 s, until cond holds; unlike waitUntil it may
// run outside the test's goroutine (the test then fails further on).
func poll(cond func() bool) {
	for deadline := time.Now().Add(30 * time.Second); !cond() && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
	}
}

// ptr returns a pointer to f, for a test hook.
func ptr(f func(g *goal)) *func(g *goal) { return &f }

// goalOf returns b's goal for drv in mode, or nil.
func goalOf(b *Builder, drv storepath.Path, mode BuildMode) *goal {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.goals[goalKey{drv, mode}]
}

// isRunning reports whether g's builder runs.
func isRunning(g *goal) bool {
	if g == nil {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.running
}

// TestOutputsRootedEarly: an output built for a request is held by the
// caller's session as soon as its goal starts, as Nix's goals root their
// outputs: a collection while the request's other builds run (an
// automatic one, say) does not take it, and the request does not report a
// path that is gone.
func TestOutputsRootedEarly(t *testing.T) {
	e := newChrootEnv(t)
	ctx := t.Context()
	gate := filepath.Join(e.root, "gate")
	drvs := e.instantiate(`{
  fast = mk { name = "early-fast"; script = "echo fast > $out"; };
  slow = mk { name = "early-slow"; script = "i=0; while [ ! -e /gate/go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; echo > $out"; };
}`, "fast", "slow")
	if err := os.Mkdir(gate, 0o755); err != nil {
		t.Fatal(err)
	}
	b := e.builder(Config{MaxJobs: 2, SandboxPaths: []string{"/gate=" + gate}})
	sess := e.st.OpenSession()
	defer sess.Close()
	for _, d := range drvs { // as the realiser roots what it is asked for
		if err := sess.AddTempRoot(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	ch := make(chan []Result, 1)
	go func() {
		res, err := b.Build(ctx, []store.DerivedPath{out(drvs["fast"]), out(drvs["slow"])}, ClientOptions{Session: sess}, nil)
		if err != nil {
			t.Error(err)
		}
		ch <- res
	}()
	outs, err := e.st.QueryDerivationOutputMap(ctx, drvs["fast"])
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the fast build to end", func() bool {
		ok, _ := e.st.IsValidPath(ctx, outs["out"])
		return ok && goalOf(b, drvs["fast"], ModeNormal) == nil
	})
	waitUntil(t, "the slow build to run", func() bool { return isRunning(goalOf(b, drvs["slow"], ModeNormal)) })
	if _, err := e.st.CollectGarbage(ctx, store.GCOptions{Action: store.GCDeleteDead, MaxFreed: math.MaxUint64}, nil); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(gate, "go"), nil, 0o644)
	res := <-ch
	if res[0].Status != Built {
		t.Fatalf("fast: %+v", res[0])
	}
	if ok, _ := e.st.IsValidPath(ctx, res[0].BuiltOutputs["out"]); !ok {
		t.Errorf("fast was built, but its output %s was collected while the request's other build ran", outs["out"])
	}
}

// TestJoinerOfStoppingGoal: a caller that joins a goal just as it stops
// for its other callers' failures (no failure stops this caller) builds
// it, rather than getting their "stopped" result.
func TestJoinerOfStoppingGoal(t *testing.T) {
	e := newChrootEnv(t)
	ctx := t.Context()
	gate := filepath.Join(e.root, "gate")
	drvs := e.instantiate(`{
  fail = mk { name = "joiner-fail"; script = "i=0; while [ ! -e /gate/go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 1"; };
  x = mk { name = "joiner-x"; script = "echo x > $out"; };
}`, "fail", "x")
	if err := os.Mkdir(gate, 0o755); err != nil {
		t.Fatal(err)
	}
	b := e.builder(Config{MaxJobs: 1, SandboxPaths: []string{"/gate=" + gate}})
	type outcome struct {
		res []Result
		err error
	}
	start := func(prog Progress, reqs ...store.DerivedPath) chan outcome {
		ch := make(chan outcome, 1)
		go func() {
			res, err := b.Build(ctx, reqs, ClientOptions{}, prog)
			ch <- outcome{res, err}
		}()
		return ch
	}
	// When x finds its only caller stopped by fail's failure, another
	// caller joins it. The first caller hears of the failure (and so
	// leaves x) only after that.
	var joined chan outcome
	hooked := make(chan struct{})
	testHookUnwanted.Store(ptr(func(g *goal) {
		if g.drvPath != drvs["x"] {
			return
		}
		g.mu.Lock()
		before := len(g.subs)
		g.mu.Unlock()
		joined = start(nil, out(drvs["x"]))
		// (On the goal's goroutine: no t.Fatal here.)
		poll(func() bool {
			g.mu.Lock()
			defer g.mu.Unlock()
			return len(g.subs) > before || goalOf(b, drvs["x"], ModeNormal) != g
		})
		close(hooked)
	}))
	defer testHookUnwanted.Store(nil)
	// x waits for the slot while fail runs.
	xWaits := make(chan struct{})
	var once sync.Once
	testHookChrootLocked.Store(ptr(func(g *goal) {
		if g.drvPath == drvs["x"] {
			once.Do(func() {
				poll(func() bool { return isRunning(goalOf(b, drvs["fail"], ModeNormal)) })
				close(xWaits)
			})
		}
	}))
	defer testHookChrootLocked.Store(nil)
	first := start(&heldFailures{until: hooked}, out(drvs["fail"]), out(drvs["x"]))
	<-xWaits
	time.Sleep(100 * time.Millisecond) // x asks for the slot
	os.WriteFile(filepath.Join(gate, "go"), nil, 0o644)
	if o := <-first; o.err != nil || o.res[0].Status.Success() {
		t.Fatalf("the first caller: %+v %v", o.res, o.err)
	}
	if joined == nil {
		t.Fatal("x was not stopped before it started")
	}
	if o := <-joined; o.err != nil || !o.res[0].Status.Success() {
		t.Errorf("the caller that joined x as it stopped: %+v %v", o.res, o.err)
	}
}

// heldFailures is a caller's progress that hears of a failed build only
// once until is closed (or after 10 s).
type heldFailures struct {
	recorder
	until chan struct{}
}

func (h *heldFailures) GoalFailed(drv string, r Result) {
	select {
	case <-h.until:
	case <-time.After(10 * time.Second):
	}
	h.recorder.GoalFailed(drv, r)
}

// cutSubst "has" the paths in has: fetching one lasts until ctx ends, then
// fails with ctx's error (a download cut short).
type cutSubst struct{ has map[storepath.Path]bool }

func (s cutSubst) Substitute(ctx context.Context, paths []storepath.Path) (bool, error) {
	for _, p := range paths {
		if s.has[p] {
			<-ctx.Done()
			return true, ctx.Err()
		}
	}
	return false, nil
}

func (s cutSubst) Incomplete(context.Context, []storepath.Path) bool { return false }

// TestCutInputNotCounted: an input whose download is cut short because
// another input failed is not a failed dependency of its own.
func TestCutInputNotCounted(t *testing.T) {
	e := newChrootEnv(t)
	drvs := e.instantiate(`rec {
  fail = mk { name = "cut-fail"; script = "exit 1"; };
  dl = mk { name = "cut-dl"; script = "echo > $out"; };
  top = mk { name = "cut-top"; inherit fail dl; script = "echo > $out"; };
}`, "fail", "dl", "top")
	outs, err := e.st.QueryDerivationOutputMap(t.Context(), drvs["dl"])
	if err != nil {
		t.Fatal(err)
	}
	b := e.builder(Config{MaxJobs: 2})
	res, err := b.Build(t.Context(), []store.DerivedPath{out(drvs["top"])},
		ClientOptions{Substituter: cutSubst{has: map[storepath.Path]bool{outs["out"]: true}}}, &recorder{})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Status != DependencyFailed || !strings.Contains(hint.Strip(res[0].ErrorMsg), "1 dependencies") {
		t.Errorf("top: %d %q, want 1 dependency failed", res[0].Status, res[0].ErrorMsg)
	}
}

// TestDeclinedBuildNoSlotDeadlock: a build that remote machines declined
// does not hold a build slot while it waits for its sandbox root's name:
// a check of the same derivation, which holds the name and waits for the
// slot, would wait for it for ever (max-jobs 1).
func TestDeclinedBuildNoSlotDeadlock(t *testing.T) {
	e := newChrootEnv(t)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	hook := filepath.Join(t.TempDir(), "declining-hook")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\nwhile true; do printf '# decline\\n'; read -r x || exit 0; done\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	drvs := e.instantiate(`{
  x = mk { name = "declined"; outputs = [ "out" "dev" ]; script = "echo > $out; echo > $dev"; };
}`, "x")
	b := e.builder(Config{MaxJobs: 1, BuildHook: hook, Builders: "fake " + DefaultSystem(), HookStore: "daemon"})
	t.Cleanup(b.Close)
	e.mustBuild(b, out(drvs["x"]))
	outs, _ := e.st.QueryDerivationOutputMap(ctx, drvs["x"])
	if _, err := e.st.CollectGarbage(ctx, store.GCOptions{Action: store.GCDeleteSpecific, Paths: []storepath.Path{outs["dev"]}}, nil); err != nil {
		t.Fatal(err)
	}
	// The check takes the sandbox root's name, then waits until the
	// normal build has been declined and waits for the name too.
	locked, proceed := make(chan struct{}), make(chan struct{})
	testHookChrootLocked.Store(ptr(func(g *goal) {
		if g.mode == ModeCheck {
			close(locked)
			<-proceed
		}
	}))
	defer testHookChrootLocked.Store(nil)
	check := make(chan error, 1)
	go func() {
		_, err := b.Build(ctx, []store.DerivedPath{out(drvs["x"], "out")}, ClientOptions{Mode: ModeCheck}, nil)
		check <- err
	}()
	<-locked
	normal := make(chan []Result, 1)
	go func() {
		res, _ := b.Build(ctx, []store.DerivedPath{out(drvs["x"], "dev")}, ClientOptions{}, nil)
		normal <- res
	}()
	time.Sleep(500 * time.Millisecond) // the normal build is declined and waits for the name
	close(proceed)
	res := <-normal
	if err := <-check; err != nil || len(res) == 0 || !res[0].Status.Success() {
		t.Errorf("check: %v; normal build: %+v (the two waited for each other until the timeout)", err, res)
	}
}

// slowLookup is a substituter that has nothing; its Incomplete waits, for
// the paths in block, until release is closed (a slow narinfo lookup).
type slowLookup struct {
	block   []storepath.Path
	entered chan struct{}
	release chan struct{}
}

func (s *slowLookup) Substitute(ctx context.Context, paths []storepath.Path) (bool, error) {
	return false, nil
}

func (s *slowLookup) Incomplete(ctx context.Context, paths []storepath.Path) bool {
	for _, p := range paths {
		if slices.Contains(s.block, p) {
			close(s.entered)
			<-s.release
		}
	}
	return false
}

// TestDepartedCallerSession: a goal others wait for may still realise its
// inputs through a caller whose client has gone (its session closed): the
// others' build does not fail for it. A starts top (top -> mid -> leaf), B
// joins top, and A hangs up while mid, whose only caller is A, looks up
// its outputs.
func TestDepartedCallerSession(t *testing.T) {
	e := newChrootEnv(t)
	drvs := e.instantiate(`rec {
  leaf = mk { name = "rs-leaf"; script = "echo > $out"; };
  mid = mk { name = "rs-mid"; inherit leaf; script = "echo > $out"; };
  top = mk { name = "rs-top"; inherit mid; script = "echo > $out"; };
}`, "leaf", "mid", "top")
	midOuts, err := e.st.QueryDerivationOutputMap(t.Context(), drvs["mid"])
	if err != nil {
		t.Fatal(err)
	}
	b := e.builder(Config{MaxJobs: 2})
	sub := &slowLookup{block: []storepath.Path{midOuts["out"]}, entered: make(chan struct{}), release: make(chan struct{})}
	sA, sB := e.st.OpenSession(), e.st.OpenSession()
	defer sB.Close()
	ctxA, cancelA := context.WithCancel(t.Context())
	doneA := make(chan struct{})
	go func() {
		defer close(doneA)
		b.Build(ctxA, []store.DerivedPath{out(drvs["top"])}, ClientOptions{Session: sA, Substituter: sub}, nil)
	}()
	select {
	case <-sub.entered:
	case <-time.After(30 * time.Second):
		t.Fatal("mid's goal did not look up its outputs")
	}
	resB := make(chan []Result, 1)
	go func() {
		res, _ := b.Build(t.Context(), []store.DerivedPath{out(drvs["top"])}, ClientOptions{Session: sB}, nil)
		resB <- res
	}()
	waitUntil(t, "B to join top", func() bool {
		g := goalOf(b, drvs["top"], ModeNormal)
		if g == nil {
			return false
		}
		g.mu.Lock()
		defer g.mu.Unlock()
		return len(g.subs) == 2
	})
	cancelA()
	<-doneA
	sA.Close() // the connection ends
	close(sub.release)
	res := <-resB
	if len(res) != 1 || !res[0].Status.Success() {
		t.Errorf("B, whose build A's departure should not affect: %+v", res)
	}
}

// TestKeepGoingShared: a caller without --keep-going that shares a goal
// with one that keeps going fails as soon as an input fails, as its own
// goal would in Nix; the goal goes on for the other, whose build of the
// other inputs completes.
func TestKeepGoingShared(t *testing.T) {
	e := newChrootEnv(t)
	gate := filepath.Join(e.root, "gate")
	drvs := e.instantiate(`rec {
  fail = mk { name = "kgs-fail"; script = "exit 1"; };
  slow = mk { name = "kgs-slow"; script = "i=0; while [ ! -e /gate/go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; echo > $out"; };
  top = mk { name = "kgs-top"; inherit fail slow; script = "echo > $out"; };
}`, "fail", "slow", "top")
	if err := os.Mkdir(gate, 0o755); err != nil {
		t.Fatal(err)
	}
	b := e.builder(Config{MaxJobs: 2, SandboxPaths: []string{"/gate=" + gate}})
	start := func(opts ClientOptions) chan []Result {
		ch := make(chan []Result, 1)
		go func() {
			res, _ := b.Build(t.Context(), []store.DerivedPath{out(drvs["top"])}, opts, nil)
			ch <- res
		}()
		return ch
	}
	keeps := start(ClientOptions{KeepGoing: true})
	waitBuilding(t, b, drvs["slow"])
	stops := start(ClientOptions{})
	select {
	case res := <-stops:
		if res[0].Status != DependencyFailed || !strings.Contains(hint.Strip(res[0].ErrorMsg), "1 dependencies of derivation") {
			t.Errorf("the caller without keep-going: %d %q", res[0].Status, res[0].ErrorMsg)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the caller without keep-going waits for the other inputs")
	}
	os.WriteFile(filepath.Join(gate, "go"), nil, 0o644)
	if res := <-keeps; res[0].Status != DependencyFailed {
		t.Errorf("the caller that keeps going: %d %q", res[0].Status, res[0].ErrorMsg)
	}
	outs, err := e.st.QueryDerivationOutputMap(t.Context(), drvs["slow"])
	if err != nil {
		t.Fatal(err)
	}
	if ok, _ := e.st.IsValidPath(t.Context(), outs["out"]); !ok {
		t.Error("the other input was not built for the caller that keeps going")
	}
}

// TestWaiters: a goal's waiters are its callers and those of the goals
// waiting for it, recursively, and follow every change of either, cached
// or not: a caller that joins or leaves, a dependent that starts or stops
// waiting.
func TestWaiters(t *testing.T) {
	e := newPlainEnv(t)
	b := e.builder(Config{})
	noop := func() {}
	leaf := b.newGoal(storepath.Path{}, nil, nil, ModeNormal, noop, "leaf")
	mid := b.newGoal(storepath.Path{}, nil, nil, ModeNormal, noop, "mid")
	a, c := b.newCall(ClientOptions{}, nil), b.newCall(ClientOptions{}, nil)
	want := func(what string, g *goal, calls ...*call) {
		t.Helper()
		got := g.waiters()
		if len(got) != len(calls) {
			t.Errorf("%s: %d waiters, want %d", what, len(got), len(calls))
			return
		}
		for _, want := range calls {
			if !slices.Contains(got, want) {
				t.Errorf("%s: waiters lack call %d", what, want.id)
			}
		}
	}
	leaf.subscribe(a)
	want("leaf's caller", leaf, a)
	mid.subscribe(c)
	want("before mid waits for leaf", leaf, a)
	link(mid, leaf, 1)
	want("mid waiting for leaf", leaf, a, c)
	want("mid", mid, c)
	link(mid, leaf, -1)
	want("mid no longer waiting", leaf, a)
	leaf.leave(a)
	want("leaf's caller gone", leaf)
}
