package store

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

func openWithBudget(t *testing.T, root string, budget uint64) *Store {
	t.Helper()
	return openWith(t, root, func(c *Config) { c.RequireSigs, c.SizeBudget = false, budget })
}

// TestSizeBudgetLRU: over its size budget, the store deletes dead paths
// least recently used first, a path counting as used when something that
// refers to it is, until it is under 90 % of the budget; live paths stay.
// Last uses survive a restart.
func TestSizeBudgetLRU(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s := openWithBudget(t, root, 1<<40)
	body := strings.Repeat("x", 10<<10)
	old := addText(t, s, "old", body+"old")
	mid := addText(t, s, "mid", body+"mid")
	dep := addText(t, s, "dep", body+"dep")
	app := addText(t, s, "app", body+"app", dep)
	recent := addText(t, s, "recent", body+"recent")
	held := addText(t, s, "held", body+"held")
	ss := s.OpenSession()
	defer ss.Close()
	if err := ss.AddTempRoot(ctx, held); err != nil {
		t.Fatal(err)
	}
	// Registered long ago; then used at these times (dep never itself).
	if _, err := s.db.w.ExecContext(ctx, "update ValidPaths set registrationTime = 1000"); err != nil {
		t.Fatal(err)
	}
	for p, when := range map[storepath.Path]int64{mid: 2000, app: 3000, recent: 4000, held: 1000} {
		s.lastUse.m.Store(p, when)
	}
	s.lastUse.dirty.Store(true)
	_, size, err := s.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	one := size / 6
	// Over budget by one and a half paths (counting the 10 % margin).
	s.cfg.SizeBudget = (size - one*3/2) * 100 / budgetPercent
	s.AutoGC(ctx, true)
	for p, want := range map[storepath.Path]bool{old: false, mid: false, dep: true, app: true, recent: true, held: true} {
		if ok, err := s.IsValidPathFresh(ctx, p); err != nil || ok != want {
			t.Errorf("%s valid = %v (%v), want %v", p, ok, err, want)
		}
	}

	// The last uses are saved and read back.
	s.Touch(recent)
	ss.Close()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openWithBudget(t, root, 1<<40)
	defer s.Close()
	if v, ok := s.lastUse.m.Load(app); !ok || v.(int64) != 3000 {
		t.Errorf("last use of app after a restart: %v %v", v, ok)
	}
	if _, ok := s.lastUse.m.Load(old); ok {
		t.Error("the last use of a deleted path was kept")
	}
}

// TestLRUOrderChain: along a chain of references, every path counts as
// used when its most recently used referrer was.
func TestLRUOrderChain(t *testing.T) {
	ctx := context.Background()
	s := openWithBudget(t, t.TempDir(), 1<<40)
	defer s.Close()
	a := addText(t, s, "a", "a")
	b := addText(t, s, "b", "b", a)
	c := addText(t, s, "c", "c", b)
	x := addText(t, s, "x", "x")
	if _, err := s.db.w.ExecContext(ctx, "update ValidPaths set registrationTime = 1000"); err != nil {
		t.Fatal(err)
	}
	s.lastUse.m.Store(c, int64(5000))
	s.lastUse.m.Store(x, int64(3000))
	s.lastUse.m.Store(a, int64(2000))
	order, err := s.lruOrder(ctx, []string{a.String(), b.String(), c.String(), x.String(), "junk.lock"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"junk.lock", x.String()}
	if got := order[:2]; got[0] != want[0] || got[1] != want[1] {
		t.Errorf("order %q: want junk, then x, then the chain", order)
	}
	// The chain shares c's time; its order among itself is by name.
	for _, p := range []storepath.Path{a, b, c} {
		found := false
		for _, n := range order[2:] {
			found = found || n == p.String()
		}
		if !found {
			t.Errorf("%s not after x in %q", p, order)
		}
	}
}

// TestLRUOrderDeriver: a derivation counts as used when an output it
// produced is (the collector deletes those outputs with it, under
// keep-derivations).
func TestLRUOrderDeriver(t *testing.T) {
	ctx := context.Background()
	s := openWithBudget(t, t.TempDir(), 1<<40)
	defer s.Close()
	drv := addText(t, s, "thing-deriver", "stands for a .drv") // the order follows the deriver column
	other := addText(t, s, "other", "o")
	outInfo := caNARInfo(t, s, "thing", narOf(t, map[string]string{"f": "out"}), nil)
	outInfo.Deriver = drv
	if err := s.AddToStoreNar(ctx, outInfo, bytes.NewReader(narOf(t, map[string]string{"f": "out"})), AddOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.db.w.ExecContext(ctx, "update ValidPaths set registrationTime = 1000"); err != nil {
		t.Fatal(err)
	}
	s.lastUse.m.Store(outInfo.Path, int64(9000))
	s.lastUse.m.Store(other, int64(2000))
	s.lastUse.m.Store(addTextPathNotValid(t), int64(5000))
	order, err := s.lruOrder(ctx, []string{drv.String(), other.String(), outInfo.Path.String()})
	if err != nil {
		t.Fatal(err)
	}
	if order[0] != other.String() {
		t.Errorf("order %q: the derivation of a path used at 9000 comes before one used at 2000", order)
	}
	n := 0
	s.lastUse.m.Range(func(any, any) bool { n++; return true })
	if n != 2 {
		t.Errorf("%d last uses kept, want the 2 of valid paths", n)
	}
}

func addTextPathNotValid(t *testing.T) storepath.Path {
	t.Helper()
	p, err := storepath.ParseBase("00000000000000000000000000000000-gone")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestSizeBudgetCountsNAR: a budget collection stops when the NAR sizes
// of what it deleted are enough, whatever its files' bytes (here none:
// the paths are directories of empty files).
func TestSizeBudgetCountsNAR(t *testing.T) {
	ctx := context.Background()
	s := openWithBudget(t, t.TempDir(), 1<<40)
	defer s.Close()
	var paths []storepath.Path
	for i := range 4 {
		files := map[string]string{}
		for j := range 100 {
			files[fmt.Sprintf("f%03d-%d", j, i)] = ""
		}
		paths = append(paths, addNAR(t, s, fmt.Sprintf("empty-%d", i), files).Path)
	}
	if _, err := s.db.w.ExecContext(ctx, "update ValidPaths set registrationTime = 1000"); err != nil {
		t.Fatal(err)
	}
	for i, p := range paths {
		s.lastUse.m.Store(p, int64(2000+i))
	}
	_, size, err := s.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	one := size / 4
	s.cfg.SizeBudget = (size - one*3/2) * 100 / budgetPercent // one and a half paths over
	s.AutoGC(ctx, true)
	for i, p := range paths {
		ok, _ := s.IsValidPathFresh(ctx, p)
		if want := i >= 2; ok != want {
			t.Errorf("path %d (used at %d) valid = %v, want %v", i, 2000+i, ok, want)
		}
	}
}

// TestLRUOrderKeepOutputs: with keep-outputs, a derivation and its output
// refer to each other; both count as used when either is, whatever order
// the walk takes.
func TestLRUOrderKeepOutputs(t *testing.T) {
	ctx := context.Background()
	for range 10 { // map order varies from run to run
		s := openWith(t, t.TempDir(), func(c *Config) { c.RequireSigs, c.SizeBudget, c.KeepOutputs = false, 1<<40, true })
		drv := addText(t, s, "thing-deriver", "stands for a .drv")
		user := addText(t, s, "user-of-drv", "refers to the .drv", drv)
		other := addText(t, s, "other", "o")
		data := narOf(t, map[string]string{"f": "out"})
		outInfo := caNARInfo(t, s, "thing", data, nil)
		outInfo.Deriver = drv
		if err := s.AddToStoreNar(ctx, outInfo, bytes.NewReader(data), AddOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.db.w.ExecContext(ctx, "update ValidPaths set registrationTime = 1000"); err != nil {
			t.Fatal(err)
		}
		s.lastUse.m.Store(user, int64(9000))
		s.lastUse.m.Store(other, int64(5000))
		order, err := s.lruOrder(ctx, []string{drv.String(), other.String(), outInfo.Path.String(), user.String()})
		if err != nil {
			t.Fatal(err)
		}
		if order[0] != other.String() {
			t.Fatalf("order %q: the output of a derivation used at 9000 comes before a path used at 5000", order)
		}
		s.Close()
	}
}

// TestSizeBudgetHysteresis: once a collection could not bring the store
// down to 90 % of its budget (the rest is alive), no other runs until the
// store has grown by 1 % of the budget.
func TestSizeBudgetHysteresis(t *testing.T) {
	ctx := context.Background()
	s := openWithBudget(t, t.TempDir(), 1<<40)
	defer s.Close()
	live := addText(t, s, "live", strings.Repeat("l", 100<<10))
	ss := s.OpenSession()
	defer ss.Close()
	if err := ss.AddTempRoot(ctx, live); err != nil {
		t.Fatal(err)
	}
	info, err := s.QueryPathInfo(ctx, live)
	if err != nil {
		t.Fatal(err)
	}
	budget := info.NarSize * 1000 / 995 // the live path alone is 99.5 % of it
	s.cfg.SizeBudget = budget
	dead := addText(t, s, "dead", strings.Repeat("d", 10<<10))
	s.AutoGC(ctx, true)
	if ok, _ := s.IsValidPathFresh(ctx, dead); ok {
		t.Fatal("the dead path survived a collection over budget")
	}
	first := s.autoGC.budgetGCAt
	if first.IsZero() || s.autoGC.sizeAfterGC == 0 {
		t.Fatalf("no collection recorded (at %v, size after %d)", first, s.autoGC.sizeAfterGC)
	}
	addText(t, s, "small", strings.Repeat("s", int(budget/100*7/10))) // over budget, by less than 1 %
	s.AutoGC(ctx, true)
	if !s.autoGC.budgetGCAt.Equal(first) {
		t.Error("a collection ran again after less than 1 % of growth")
	}
	addText(t, s, "more", strings.Repeat("m", int(budget/100*2)))
	s.AutoGC(ctx, true)
	if s.autoGC.budgetGCAt.Equal(first) {
		t.Error("no collection after the store grew by 1 % of its budget")
	}
}

// TestSizeBudgetHoldOffEndsWithCollection: the hold-off after a budget
// collection that freed too little ends when another collection (the
// host's nix-store --gc) frees space: the store that grows over its budget
// again is collected, though it is smaller than when the hold-off began.
// Deleting some paths (nix-store --delete) does not end it.
func TestSizeBudgetHoldOffEndsWithCollection(t *testing.T) {
	ctx := context.Background()
	s := openWithBudget(t, t.TempDir(), 1<<40)
	defer s.Close()
	live := addText(t, s, "live", strings.Repeat("l", 100<<10))
	ss := s.OpenSession()
	if err := ss.AddTempRoot(ctx, live); err != nil {
		t.Fatal(err)
	}
	info, err := s.QueryPathInfo(ctx, live)
	if err != nil {
		t.Fatal(err)
	}
	budget := info.NarSize / 2 // the live path alone is over it
	s.cfg.SizeBudget = budget
	s.AutoGC(ctx, true)
	first := s.autoGC.budgetGCAt
	if first.IsZero() || s.autoGC.sizeAfterGC == 0 {
		t.Fatalf("no hold-off recorded (at %v, size after %d)", first, s.autoGC.sizeAfterGC)
	}
	small := addText(t, s, "small", "s")
	if _, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteSpecific, Paths: []storepath.Path{small}, MaxFreed: math.MaxUint64}, nil); err != nil {
		t.Fatal(err)
	}
	if s.autoGC.sizeAfterGC == 0 {
		t.Error("deleting one small path (nix-store --delete) ended the hold-off")
	}
	ss.Close() // the path is dead now, and a client collects it
	if _, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, nil); err != nil {
		t.Fatal(err)
	}
	s.autoGC.mu.Lock()
	s.autoGC.lastCheck = time.Time{} // due for a check
	s.autoGC.mu.Unlock()
	dead := addText(t, s, "dead", strings.Repeat("d", int(budget*3/2)))
	s.AutoGC(ctx, true) // over budget, smaller than at the hold-off
	if ok, _ := s.IsValidPathFresh(ctx, dead); ok {
		t.Error("the store over its budget was not collected: the hold-off outlived a collection that freed space")
	}
}

// TestCloseStopsAutoGC: Close stops a running automatic collection and
// waits for it, before it closes the database the collection uses.
func TestCloseStopsAutoGC(t *testing.T) {
	ctx := context.Background()
	s := openWithBudget(t, t.TempDir(), 1<<40)
	for i := range 300 {
		addText(t, s, fmt.Sprintf("p%d", i), fmt.Sprintf("contents %d", i))
	}
	s.cfg.SizeBudget = 1 // everything is over it
	s.AutoGC(ctx, false)
	s.autoGC.mu.Lock()
	running := s.autoGC.running
	s.autoGC.mu.Unlock()
	if running == nil {
		t.Fatal("no automatic collection started")
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case <-running:
	default:
		t.Error("the automatic collection still runs after Close")
	}
}

// TestPropagateLastUse: a path counts as used as recently as anything
// that refers to it, directly or not, also through a cycle (a derivation
// and its outputs with keep-outputs).
func TestPropagateLastUse(t *testing.T) {
	for _, tc := range []struct {
		name      string
		own       map[int64]int64
		referrers map[int64][]int64
		want      map[int64]int64
	}{
		{"chain", map[int64]int64{1: 10, 2: 5, 3: 30}, map[int64][]int64{1: {2}, 2: {3}}, map[int64]int64{1: 30, 2: 30, 3: 30}},
		{"two referrers", map[int64]int64{1: 10, 2: 50, 3: 20}, map[int64][]int64{1: {2, 3}}, map[int64]int64{1: 50, 2: 50, 3: 20}},
		{"unrelated", map[int64]int64{1: 10, 2: 50}, nil, map[int64]int64{1: 10, 2: 50}},
		{"cycle", map[int64]int64{1: 10, 2: 20, 3: 90}, map[int64][]int64{1: {2}, 2: {1, 3}}, map[int64]int64{1: 90, 2: 90, 3: 90}},
	} {
		nodes := map[int64]*useNode{}
		for id, own := range tc.own {
			nodes[id] = &useNode{own: own, referrers: tc.referrers[id]}
		}
		propagateLastUse(nodes)
		for id, want := range tc.want {
			if got := nodes[id].eff; got != want {
				t.Errorf("%s: node %d: eff %d, want %d", tc.name, id, got, want)
			}
		}
	}
}

// TestAutoGCSkipsClosedGate: while collections wait for a gate (the jobs'
// journals still another daemon's), an automatic collection is not
// started, so a request that checks the free space does not wait for the
// gate.
func TestAutoGCSkipsClosedGate(t *testing.T) {
	ctx := context.Background()
	s := openWithBudget(t, t.TempDir(), 1)
	defer s.Close()
	addText(t, s, "p", "contents")
	s.SetGCGate(func(ctx context.Context, log func(string)) error {
		<-ctx.Done()
		return ctx.Err()
	})
	done := make(chan struct{})
	go func() {
		s.AutoGC(ctx, true)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("AutoGC waited for the gate")
	}
	s.autoGC.mu.Lock()
	running := s.autoGC.running
	s.autoGC.mu.Unlock()
	if running != nil {
		t.Error("an automatic collection was started behind a closed gate")
	}
}
