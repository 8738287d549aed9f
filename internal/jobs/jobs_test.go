package jobs

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

func testStore(t *testing.T) *store.Store {
	t.Helper()
	root := t.TempDir()
	s, err := store.Open(context.Background(), store.Config{
		StoreDir:     "/nix/store",
		RealStoreDir: filepath.Join(root, "nix/store"),
		StateDir:     filepath.Join(root, "nix/var/nix"),
		LogDir:       filepath.Join(root, "nix/var/log/nix"),
		RequireSigs:  true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// container starts a shell as init of a new pid namespace, with a child
// sleeping in it, and returns the host pids of both and a function that
// ends the namespace (by killing its init).
func container(t *testing.T) (initPID, childPID int, kill func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create pid namespaces")
	}
	cmd := exec.Command("unshare", "--pid", "--fork", "--kill-child", "sh", "-c", "sleep 1000 & wait")
	if err := cmd.Start(); err != nil {
		t.Fatalf("unshare: %v", err)
	}
	var once sync.Once
	kill = func() {
		once.Do(func() {
			cmd.Process.Kill()
			cmd.Wait()
		})
	}
	t.Cleanup(kill)
	children := func(pid int) []int {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + strconv.Itoa(pid) + "/children")
		var out []int
		for _, f := range strings.Fields(string(b)) {
			n, _ := strconv.Atoi(f)
			out = append(out, n)
		}
		return out
	}
	// Poll for the processes to appear (not a timed assertion: the
	// deadline only bounds a broken setup).
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if c := children(cmd.Process.Pid); len(c) == 1 {
			if g := children(c[0]); len(g) == 1 {
				return c[0], g[0], kill
			}
		}
	}
	t.Fatal("the namespace's processes did not appear")
	return 0, 0, nil
}

func TestAttachGroupsConnectionsOfANamespace(t *testing.T) {
	st := testStore(t)
	now := time.Unix(1000, 0)
	m, err := New(t.Context(), st, Options{Lease: time.Hour, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Attach(os.Getpid(), "t"); !errors.Is(err, ErrNotJob) {
		t.Fatalf("Attach(own pid) = %v, want ErrNotJob", err)
	}
	initPID, child, kill := container(t)
	a, err := m.Attach(child, "tenant-a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Attach(initPID, "tenant-a")
	if err != nil {
		t.Fatal(err)
	}
	if a.ID() != b.ID() || a.Session() != b.Session() {
		t.Fatalf("two processes of one namespace got different jobs: %s, %s", a.ID(), b.ID())
	}
	_, other, _ := container(t)
	c, err := m.Attach(other, "tenant-b")
	if err != nil {
		t.Fatal(err)
	}
	if c.ID() == a.ID() {
		t.Fatalf("two namespaces share job %s", a.ID())
	}
	c.Release()
	a.Release()
	b.Release()
	// Released connections do not end a job whose namespace lives.
	if ended := m.Reap(); len(ended) != 0 {
		t.Fatalf("Reap ended %v while both namespaces live", ended)
	}
	kill()
	waitGone(t, initPID)
	ended := m.Reap()
	if len(ended) != 1 || ended[0] != a.ID() {
		t.Fatalf("Reap after the namespace ended = %v, want [%s]", ended, a.ID())
	}
	if live := m.Live(); len(live) != 1 || live[0] != c.ID() {
		t.Fatalf("Live = %v, want [%s]", live, c.ID())
	}
}

// TestNestedNamespaceIsTheJobs: a process in a pid namespace the job made
// inside its container (bwrap --unshare-pid, a container of its own) is
// of the container's job, sharing its session and its connection limit:
// by its own namespace a job could open as many sessions, and as many
// connections, as it liked.
func TestNestedNamespaceIsTheJobs(t *testing.T) {
	st := testStore(t)
	m, err := New(t.Context(), st, Options{MaxConns: 2})
	if err != nil {
		t.Fatal(err)
	}
	initPID, nested := nestedContainer(t)
	a, err := m.Attach(initPID, "t")
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Attach(nested, "t")
	if err != nil {
		t.Fatal(err)
	}
	if a.ID() != b.ID() || a.Session() != b.Session() {
		t.Errorf("a process of a nested namespace got job %s, its container's is %s", b.ID(), a.ID())
	}
	var tooMany *TooManyConnsError
	if _, err := m.Attach(nested, "t"); !errors.As(err, &tooMany) {
		t.Errorf("a third connection of a job limited to 2, from its nested namespace: %v, want TooManyConnsError", err)
	}
	// job-namespace-depth 2 (jobs in containers of a runner's container):
	// the nested namespace is a job of its own, and the runner's
	// namespace, not that deep, is one too.
	m2, err := New(t.Context(), testStore(t), Options{Depth: 2})
	if err != nil {
		t.Fatal(err)
	}
	outer, err := m2.Attach(initPID, "t")
	if err != nil {
		t.Fatal(err)
	}
	inner, err := m2.Attach(nested, "t")
	if err != nil {
		t.Fatal(err)
	}
	if outer.ID() == inner.ID() {
		t.Errorf("with depth 2, the runner's namespace and the one nested in it share job %s", outer.ID())
	}
}

// nestedContainer starts a shell as init of a new pid namespace, in which
// another pid namespace runs a sleep, and returns the host pids of the
// outer init and of the sleep.
func nestedContainer(t *testing.T) (initPID, nested int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create pid namespaces")
	}
	cmd := exec.Command("unshare", "--pid", "--fork", "--kill-child", "sh", "-c",
		"unshare --pid --fork --kill-child sleep 1000 & wait")
	if err := cmd.Start(); err != nil {
		t.Fatalf("unshare: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	// Down the first children: unshare, sh (the outer init), unshare,
	// sleep (the inner init). Polled, as in container.
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		chain := []int{cmd.Process.Pid}
		for len(chain) < 4 {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", chain[len(chain)-1], chain[len(chain)-1]))
			f := strings.Fields(string(b))
			if len(f) != 1 {
				break
			}
			n, _ := strconv.Atoi(f[0])
			chain = append(chain, n)
		}
		if len(chain) == 4 {
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", chain[3])); err == nil && strings.HasPrefix(string(b), "sleep") {
				return chain[1], chain[3]
			}
		}
	}
	t.Fatal("the namespaces' processes did not appear")
	return 0, 0
}

func TestLeaseEndsAnIdleJob(t *testing.T) {
	st := testStore(t)
	now := time.Unix(1000, 0)
	m, err := New(t.Context(), st, Options{Lease: time.Hour, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	_, child, _ := container(t)
	a, err := m.Attach(child, "")
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(2 * time.Hour)
	if ended := m.Reap(); len(ended) != 0 {
		t.Fatalf("Reap ended %v while a connection is open", ended)
	}
	a.Release()
	now = now.Add(59 * time.Minute)
	if ended := m.Reap(); len(ended) != 0 {
		t.Fatalf("Reap ended %v before the lease ran out", ended)
	}
	now = now.Add(time.Minute)
	if ended := m.Reap(); len(ended) != 1 {
		t.Fatalf("Reap after the lease = %v, want one job", ended)
	}
	// The namespace still lives: a new connection starts a new session.
	b, err := m.Attach(child, "")
	if err != nil {
		t.Fatal(err)
	}
	if b.Session() == a.Session() {
		t.Fatal("a connection after the lease reused the ended session")
	}
	b.Release()
}

// waitGone polls until pid has exited (it may stay a zombie).
func waitGone(t *testing.T, pid int) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return
		}
		if fs := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:])); len(fs) > 0 && fs[0] == "Z" {
			return
		}
	}
	t.Fatalf("pid %d did not exit", pid)
}

// TestMaxConns: a job may have MaxConns connections open at once; one more
// is refused, and a released one makes room.
func TestMaxConns(t *testing.T) {
	st := testStore(t)
	m, err := New(t.Context(), st, Options{MaxConns: 2})
	if err != nil {
		t.Fatal(err)
	}
	_, child, _ := container(t)
	a, err := m.Attach(child, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Attach(child, ""); err != nil {
		t.Fatal(err)
	}
	var tooMany *TooManyConnsError
	if _, err := m.Attach(child, ""); !errors.As(err, &tooMany) || tooMany.Max != 2 || tooMany.Job != a.ID() {
		t.Fatalf("a third connection: %v, want a TooManyConnsError for %s", err, a.ID())
	}
	a.Release()
	a.Release() // twice: still one connection released
	if _, err := m.Attach(child, ""); err != nil {
		t.Fatalf("a connection after one was released: %v", err)
	}
	if _, err := m.Attach(child, ""); !errors.As(err, &tooMany) {
		t.Fatalf("a third connection again: %v", err)
	}
}

// addText adds a text path named name to st.
func addText(t *testing.T, st *store.Store, name string) storepath.Path {
	t.Helper()
	p, err := st.AddToStoreContent(context.Background(), name, contentaddress.Text, hash.SHA256, nil, strings.NewReader(name), false)
	if err != nil {
		t.Fatal(err)
	}
	return p.Path
}

// newManager is New, failing the test on an error.
func newManager(t *testing.T, st *store.Store) *Manager {
	t.Helper()
	m, err := New(t.Context(), st, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// collectAll deletes every dead path of st and returns those it deleted.
func collectAll(t *testing.T, st *store.Store) []string {
	t.Helper()
	res, err := st.CollectGarbage(context.Background(), store.GCOptions{Action: store.GCDeleteDead, MaxFreed: math.MaxUint64}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return res.Paths
}

// TestJournalOutlivesDaemon: a daemon started after another (a restart)
// takes up the jobs still running with their roots, which a collection
// then keeps; an ended job's journal is deleted, and so is one whose job
// ended while no daemon ran.
func TestJournalOutlivesDaemon(t *testing.T) {
	st := testStore(t)
	held, gone := addText(t, st, "held"), addText(t, st, "gone")
	m := newManager(t, st)
	_, live, _ := container(t)
	initEnded, ended, kill := container(t)
	a, err := m.Attach(live, "ci")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Session().AddTempRoot(context.Background(), held); err != nil {
		t.Fatal(err)
	}
	b, err := m.Attach(ended, "ci")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Session().AddTempRoot(context.Background(), gone); err != nil {
		t.Fatal(err)
	}
	a.Release()
	b.Release()
	if err := m.Close(); err != nil { // the daemon stops
		t.Fatal(err)
	}
	kill() // one job ends meanwhile
	waitGone(t, initEnded)

	m2 := newManager(t, st)
	defer m2.Close()
	if got := m2.Live(); len(got) != 1 || got[0] != a.ID() {
		t.Fatalf("jobs taken up: %v, want [%s]", got, a.ID())
	}
	deleted := collectAll(t, st)
	if ok, _ := st.IsValidPath(context.Background(), held); !ok {
		t.Errorf("the collection after the restart deleted %s, which the running job holds (deleted: %v)", held, deleted)
	}
	if ok, _ := st.IsValidPath(context.Background(), gone); ok {
		t.Errorf("%s, held by a job that ended, survived the collection (deleted: %v)", gone, deleted)
	}
	if ents, _ := filepath.Glob(filepath.Join(st.StateDir(), "nixyard-jobs", "pidns-*")); len(ents) != 1 || filepath.Base(ents[0]) != a.ID() {
		t.Errorf("journals after the restart: %v, want only %s's", ents, a.ID())
	}
}

// TestSecondManagerLeavesJournals: another Manager on the same store (a
// second daemon) keeps no journals and leaves the first's alone: the roots
// the first daemon's job adds afterwards are still taken up after its
// restart.
func TestSecondManagerLeavesJournals(t *testing.T) {
	st := testStore(t)
	early, late := addText(t, st, "early"), addText(t, st, "late")
	m := newManager(t, st)
	_, live, _ := container(t)
	a, err := m.Attach(live, "ci")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Session().AddTempRoot(context.Background(), early); err != nil {
		t.Fatal(err)
	}
	newManager(t, st).Close() // another daemon on the store starts and ends
	// The main daemon's job goes on.
	if err := a.Session().AddTempRoot(context.Background(), late); err != nil {
		t.Fatal(err)
	}
	a.Release()
	m.Close() // restart
	defer newManager(t, st).Close()
	collectAll(t, st)
	assertValid(t, st, "held by the running job, collected after the restart", early, late)
}

// TestJournalsHandedOver: a daemon started while another still keeps the
// journals (it drains its connections) takes them once that one lets them
// go, with the roots of both, so that a third daemon takes up the job
// with every root. It takes them though it was itself told to stop
// meanwhile (a second upgrade): it still serves its jobs while it drains.
func TestJournalsHandedOver(t *testing.T) {
	st := testStore(t)
	first, second := addText(t, st, "first"), addText(t, st, "second")
	_, live, _ := container(t)
	old := newManager(t, st)
	a, err := old.Attach(live, "ci")
	if err != nil {
		t.Fatal(err)
	}
	a.Session().AddTempRoot(context.Background(), first)
	ctx, stopNext := context.WithCancel(t.Context())
	next, err := New(ctx, st, Options{}) // while old keeps the journals
	if err != nil {
		t.Fatal(err)
	}
	if next.Predecessor() == nil {
		t.Fatal("no predecessor while another Manager keeps the journals")
	}
	b, err := next.Attach(live, "ci")
	if err != nil {
		t.Fatal(err)
	}
	b.Session().AddTempRoot(context.Background(), second)
	// A collection meanwhile waits for the hand-over: it would miss the
	// roots of the jobs the old daemon keeps once that one has stopped.
	collected := make(chan []string, 1)
	go func() { collected <- collectAll(t, st) }()
	select {
	case <-collected:
		t.Fatal("a collection ran while another daemon kept the journals")
	case <-time.After(300 * time.Millisecond):
	}
	stopNext()
	a.Release()
	old.Close()
	select {
	case <-collected:
	case <-time.After(30 * time.Second):
		t.Fatal("the collection still waits after the old daemon let the journals go")
	}
	assertValid(t, st, "held by the running job, collected as the journals were handed over", first, second)
	select {
	case <-next.Predecessor():
	case <-time.After(30 * time.Second):
		t.Fatal("the second daemon did not take the journals")
	}
	b.Release()
	next.Close()
	defer newManager(t, st).Close()
	collectAll(t, st)
	assertValid(t, st, "held by the running job, collected", first, second)
}

// assertValid fails the test, saying why, for each of paths not valid.
func assertValid(t *testing.T, st *store.Store, why string, paths ...storepath.Path) {
	t.Helper()
	for _, p := range paths {
		if ok, _ := st.IsValidPath(context.Background(), p); !ok {
			t.Errorf("%s: %s", p, why)
		}
	}
}

// TestWaitingDaemonsJobs: a daemon that served jobs while another kept the
// journals (it started during that one's drain) and exits before it ever
// got them leaves its jobs' journals behind, and the daemon that has the
// journals next takes them up with the rest.
func TestWaitingDaemonsJobs(t *testing.T) {
	st := testStore(t)
	first, second := addText(t, st, "kept-by-the-old-daemon"), addText(t, st, "kept-by-the-waiting-one")
	_, live, _ := container(t)
	old := newManager(t, st)
	a, err := old.Attach(live, "ci")
	if err != nil {
		t.Fatal(err)
	}
	a.Session().AddTempRoot(t.Context(), first)
	waiting := newManager(t, st) // started during old's drain; told to stop too
	b, err := waiting.Attach(live, "ci")
	if err != nil {
		t.Fatal(err)
	}
	b.Session().AddTempRoot(t.Context(), second)
	b.Release()
	waiting.Close() // gone before old
	a.Release()
	old.Close()

	next := newManager(t, st)
	defer next.Close()
	if got := next.Live(); len(got) != 1 {
		t.Errorf("live jobs after the hand-over: %v, want the one job", got)
	}
	collectAll(t, st)
	assertValid(t, st, "held by the running job through a daemon that never kept the journals", first, second)
	if ents, _ := filepath.Glob(filepath.Join(st.StateDir(), "nixyard-jobs", "waiting-*")); len(ents) != 0 {
		t.Errorf("waiting directories left: %v", ents)
	}
}

// TestWaitingDaemonGoneLater: a daemon that waits for the journals while
// this one has them already (three daemons in one upgrade's overlap) and
// exits without them: the next collection here takes up its jobs' roots
// first.
func TestWaitingDaemonGoneLater(t *testing.T) {
	st := testStore(t)
	held := addText(t, st, "held-through-a-gone-waiting-daemon")
	_, live, _ := container(t)
	keeper := newManager(t, st)
	defer keeper.Close()
	waiting := newManager(t, st)
	b, err := waiting.Attach(live, "ci")
	if err != nil {
		t.Fatal(err)
	}
	b.Session().AddTempRoot(t.Context(), held)
	b.Release()
	waiting.Close()
	collectAll(t, st)
	assertValid(t, st, "held by a running job through a daemon gone since the journals were taken", held)
	if got := keeper.Live(); len(got) != 1 {
		t.Errorf("live jobs after the collection: %v, want the waiting daemon's one", got)
	}
}

// TestCollectionEndsJobsOver: a collection started by the store itself (an
// automatic one: min-free, the size budget) ends the jobs whose namespaces
// are gone before it reads the roots, as one a client asks for does, and
// deletes what only they held; a live job's paths stay. Without, an ended
// job held its paths until the reaping interval came round, and a
// collection that freed nothing for it held off the next.
func TestCollectionEndsJobsOver(t *testing.T) {
	st := testStore(t)
	held, gone := addText(t, st, "held-by-live"), addText(t, st, "held-by-ended")
	m := newManager(t, st)
	defer m.Close()
	_, live, _ := container(t)
	initEnded, ended, kill := container(t)
	for pid, p := range map[int]storepath.Path{live: held, ended: gone} {
		c, err := m.Attach(pid, "ci")
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Session().AddTempRoot(context.Background(), p); err != nil {
			t.Fatal(err)
		}
		c.Release()
	}
	kill()
	waitGone(t, initEnded)
	deleted := collectAll(t, st)
	assertValid(t, st, "held by a live job", held)
	if ok, _ := st.IsValidPath(context.Background(), gone); ok {
		t.Errorf("%s, held by a job that ended, survived the collection (deleted: %v)", gone, deleted)
	}
	if n := len(m.Live()); n != 1 {
		t.Errorf("%d jobs live after the collection, want 1", n)
	}
}
