package cache

import (
	"bytes"
	"crypto/ed25519"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/narinfo"
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

func testStore(t *testing.T) *store.Store {
	t.Helper()
	root := t.TempDir()
	st, err := store.Open(t.Context(), store.Config{
		StoreDir: "/nix/store", RealStoreDir: filepath.Join(root, "nix/store"),
		StateDir: filepath.Join(root, "nix/var/nix"), LogDir: filepath.Join(root, "nix/var/log/nix"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// addPair adds a path, dep, and one that refers to it, top.
func addPair(t *testing.T, st *store.Store) (dep, top *store.PathInfo) {
	t.Helper()
	ctx := t.Context()
	dep, err := st.AddToStoreContent(ctx, "dep", contentaddress.Text, hash.SHA256, nil, strings.NewReader("dep"), false)
	if err != nil {
		t.Fatal(err)
	}
	top, err = st.AddToStoreContent(ctx, "top", contentaddress.Text, hash.SHA256, []storepath.Path{dep.Path}, strings.NewReader("uses "+st.Dir().Abs(dep.Path)), false)
	if err != nil {
		t.Fatal(err)
	}
	return dep, top
}

// memCache is a binary cache over HTTP that keeps what is PUT to it, in
// order: what a writable cache (an S3 bucket, a WebDAV server) does for
// Nix's HTTP binary cache store.
type memCache struct {
	mu     sync.Mutex
	files  map[string][]byte
	order  []string
	refuse string // a file it answers 413 to
}

func (m *memCache) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch r.Method {
	case http.MethodPut:
		if r.URL.Path[1:] == m.refuse {
			http.Error(w, "too large", http.StatusRequestEntityTooLarge)
			return
		}
		b, _ := io.ReadAll(r.Body)
		m.files[r.URL.Path[1:]] = b
		m.order = append(m.order, r.URL.Path[1:])
	case http.MethodHead, http.MethodGet:
		b, ok := m.files[r.URL.Path[1:]]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(b)
	}
}

// TestPush: a path and its closure go to the cache, references first and
// each NAR before its narinfo; the narinfos are signed and their NARs
// decompress to the paths' NAR hashes; what the cache has is not sent
// again; and a queue left by a stopped pusher is pushed by the next.
func TestPush(t *testing.T) {
	ctx := t.Context()
	st := testStore(t)
	dep, top := addPair(t, st)
	_, priv, _ := ed25519.GenerateKey(nil)
	key := signature.SecretKey{Name: "fleet-1", Key: priv}
	mc, target, opts := memTarget(t)
	queue := filepath.Join(t.TempDir(), "queue")
	p, err := NewPusher(t.Context(), st, target, opts, queue, []signature.SecretKey{key}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Enqueue(t.Context(), top.Path); err != nil {
		t.Fatal(err)
	}
	if n := p.QueueLen(); n != 1 {
		t.Errorf("queue length %d, want 1", n)
	}
	// A new pusher on the same queue (as after a restart) pushes it.
	p2, err := NewPusher(t.Context(), st, target, opts, queue, []signature.SecretKey{key}, nil)
	if err != nil {
		t.Fatal(err)
	}
	pushed := 0
	p2.OnPushed = func() { pushed++ }
	if err := p2.pushQueued(ctx); err != nil {
		t.Fatal(err)
	}
	if pushed != 2 || p2.QueueLen() != 0 {
		t.Errorf("%d paths pushed (want top and dep), %d left queued", pushed, p2.QueueLen())
	}
	if left, _ := os.ReadDir(queue); len(left) != 0 {
		t.Errorf("queue after the push: %v", left)
	}
	pos := map[string]int{}
	for i, f := range mc.order {
		pos[f] = i
	}
	for _, info := range []*store.PathInfo{dep, top} {
		name := info.Path.HashPart() + ".narinfo"
		ni, err := narinfo.Parse(st.Dir(), mc.files[name])
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		fp := signature.Fingerprint(st.Dir(), ni.StorePath, ni.NarHash, ni.NarSize, ni.References)
		if !signature.VerifyAny(fp, ni.Sigs, []signature.PublicKey{key.PublicKey()}) || ni.Compression != "zstd" {
			t.Errorf("%s: %+v", name, ni)
		}
		zr, err := zstd.NewReader(bytes.NewReader(mc.files[ni.URL]))
		if err != nil {
			t.Fatal(err)
		}
		nar, err := io.ReadAll(zr)
		zr.Close()
		if err != nil || !hash.Sum(hash.SHA256, nar).Equal(info.NarHash) || !hash.Sum(hash.SHA256, mc.files[ni.URL]).Equal(ni.FileHash) {
			t.Errorf("%s: the NAR does not match (%v)", name, err)
		}
		if pos[ni.URL] > pos[name] {
			t.Errorf("%s was written before its NAR", name)
		}
	}
	if pos[dep.Path.HashPart()+".narinfo"] > pos[top.Path.HashPart()+".narinfo"] {
		t.Error("top was pushed before its reference")
	}
	if _, ok := mc.files["nix-cache-info"]; !ok {
		t.Error("no nix-cache-info")
	}
	// Pushed again: nothing is sent.
	n := len(mc.order)
	if err := p2.Push(ctx, top.Path); err != nil || len(mc.order) != n {
		t.Errorf("a second push sent %d files (%v)", len(mc.order)-n, err)
	}
}

func TestOpenTarget(t *testing.T) {
	noAWSConfig(t) // s3 URLs fail on their parameters, not for want of credentials
	t.Setenv("AWS_ACCESS_KEY_ID", "AKID")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "s")
	if _, _, err := OpenTarget(t.Context(), "s3://b?multipart-upload=false&buffer-size=1&aws-region=eu-west-1&profile=", nil); err != nil {
		t.Error(err)
	}
	dir := t.TempDir()
	for _, u := range []string{"file://relative/dir", "ftp://x", "file:", "s3://?region=x", "http://h/?x=1", "https://h/#f",
		"file://" + dir + "?compression=lzma", "file://" + dir + "?compression-level=10&compression=xz",
		"file://" + dir + "?compression=none&compression-level=1", "file://" + dir + "?write-nar-listing=maybe",
		"file://" + dir + "?secret-key=" + dir + "/missing", "file://" + dir + "?local-nar-cache=/tmp",
		"file://" + dir + "?compression=xz&compression=zstd",
		"s3://b?narinfo-compression=xz", "s3://b?multipart-upload=true", "s3://b?scheme=ftp",
	} {
		if _, _, err := OpenTarget(t.Context(), u, nil); err == nil {
			t.Errorf("OpenTarget(t.Context(), %q, nil): no error", u)
		}
	}
	keyFile := filepath.Join(dir, "key")
	_, priv, _ := ed25519.GenerateKey(nil)
	if err := os.WriteFile(keyFile, []byte(signature.SecretKey{Name: "k", Key: priv}.String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, opts, err := OpenTarget(t.Context(), "http://h/c?compression=xz&compression-level=9&write-nar-listing=1&parallel-compression=true&index-debug-info=yes&secret-key="+keyFile, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := (Options{Compression: "xz", Level: 9, Parallel: true, Listing: true, DebugInfo: true}); opts.Compression != want.Compression || opts.Level != want.Level ||
		opts.Parallel != want.Parallel || opts.Listing != want.Listing || opts.DebugInfo != want.DebugInfo || len(opts.Keys) != 1 || opts.Keys[0].Name != "k" {
		t.Errorf("options: %+v", opts)
	}
	tg, opts, err := OpenTarget(t.Context(), "file://"+dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if opts.Compression != "zstd" || opts.Level != -1 || opts.Listing || len(opts.Keys) != 0 {
		t.Errorf("default options: %+v", opts)
	}
	if err := tg.Put(t.Context(), "nar/x.nar", strings.NewReader("data"), 4, ""); err != nil {
		t.Fatal(err)
	}
	if ok, err := tg.Has(t.Context(), "nar/x.nar"); !ok || err != nil {
		t.Errorf("Has after Put: %v %v", ok, err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "nar/x.nar")); string(b) != "data" {
		t.Errorf("file: %q", b)
	}
}

// TestPushFailures: a path the cache refuses does not hold up the others,
// and is set aside after maxAttempts refusals; an unreachable cache counts
// against no path; a queued path is not collected; a redirect is not
// taken for a write.
func TestPushFailures(t *testing.T) {
	ctx := t.Context()
	st := testStore(t)
	_, top := addPair(t, st)
	other, err := st.AddToStoreContent(ctx, "other", contentaddress.Text, hash.SHA256, nil, strings.NewReader("other"), false)
	if err != nil {
		t.Fatal(err)
	}
	// The cache refuses the queued path that comes first.
	refused, pushed := top.Path, other.Path
	if other.Path.String() < top.Path.String() {
		refused, pushed = other.Path, top.Path
	}
	mc := &memCache{files: map[string][]byte{}, refuse: refused.HashPart() + ".narinfo"}
	srv := httptest.NewServer(mc)
	defer srv.Close()
	target, opts, err := OpenTarget(t.Context(), srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	queue := filepath.Join(t.TempDir(), "queue")
	p, err := NewPusher(t.Context(), st, target, opts, queue, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Enqueue(t.Context(), top.Path, other.Path); err != nil {
		t.Fatal(err)
	}
	// Dead but queued: the collector leaves them and what they need.
	if _, err := st.CollectGarbage(ctx, store.GCOptions{Action: store.GCDeleteDead, MaxFreed: math.MaxUint64}, nil); err != nil {
		t.Fatal(err)
	}
	for _, q := range append(top.References, top.Path, other.Path) {
		if ok, _ := st.IsValidPathFresh(ctx, q); !ok {
			t.Errorf("%s, queued (or needed by what is), was collected", q)
		}
	}
	if err := p.pushQueued(ctx); err != nil {
		t.Errorf("a refusal of one path stopped the round: %v", err)
	}
	if _, ok := mc.files[pushed.HashPart()+".narinfo"]; !ok {
		t.Error("the refused path held up another")
	}
	for range maxAttempts - 2 {
		clear(p.notBefore) // its own backoff, skipped
		p.pushQueued(ctx)
	}
	// Refused too often, but failed/ cannot be made: queued and rooted
	// still, until it can be set aside.
	blocker := filepath.Join(queue, "failed")
	if _, err := os.Stat(blocker); err == nil {
		t.Fatalf("set aside after %d refusals, before %d", maxAttempts-1, maxAttempts)
	}
	if _, err := os.Stat(filepath.Join(queue, refused.String())); err != nil {
		t.Fatalf("not queued after %d refusals: %v", maxAttempts-1, err)
	}
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	clear(p.notBefore)
	p.pushQueued(ctx)
	if _, err := os.Stat(filepath.Join(queue, refused.String())); err != nil {
		t.Errorf("a path that could not be set aside left the queue: %v", err)
	}
	if _, err := st.CollectGarbage(ctx, store.GCOptions{Action: store.GCDeleteDead, MaxFreed: math.MaxUint64}, nil); err != nil {
		t.Fatal(err)
	}
	if ok, _ := st.IsValidPathFresh(ctx, refused); !ok {
		t.Error("a path that could not be set aside was collected")
	}
	os.Remove(blocker)
	clear(p.notBefore)
	p.pushQueued(ctx)
	if _, err := os.Stat(filepath.Join(queue, "failed", refused.String())); err != nil {
		t.Errorf("after %d refusals the entry was not set aside: %v", maxAttempts, err)
	}

	// An unreachable cache: the round ends with its error, no path counts it.
	down := httptest.NewServer(http.NotFoundHandler())
	downURL := down.URL
	down.Close()
	dt, dopts, _ := OpenTarget(t.Context(), downURL, nil)
	q2 := filepath.Join(t.TempDir(), "queue")
	p2, err := NewPusher(t.Context(), st, dt, dopts, q2, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p2.Enqueue(t.Context(), other.Path); err != nil {
		t.Fatal(err)
	}
	for range maxAttempts + 1 {
		if err := p2.pushQueued(ctx); err == nil {
			t.Fatal("a push to an unreachable cache gave no error")
		}
	}
	if data, err := os.ReadFile(filepath.Join(q2, other.Path.String())); err != nil || len(data) != 0 {
		t.Errorf("an outage was counted against the path: %q %v", data, err)
	}

	redirect := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/login" {
			w.Write([]byte("a login page"))
			return
		}
		http.Redirect(w, r, "/login", http.StatusFound)
	}))
	defer redirect.Close()
	rt, _, _ := OpenTarget(t.Context(), redirect.URL, nil)
	if err := rt.Put(ctx, "x.narinfo", strings.NewReader("x"), 1, "text/plain"); err == nil {
		t.Error("a redirected PUT counted as written")
	}
	if ok, err := rt.Has(ctx, "x.narinfo"); ok || err == nil {
		t.Errorf("a redirected HEAD: %v %v", ok, err)
	}
}

// TestPushQueueHandover: a daemon's pusher started while the daemon before
// still pushes the same queue (an upgrade) holds the queued paths, and
// lets go of those the other one pushed meanwhile: their roots would
// otherwise keep them from every collection until the next restart.
func TestPushQueueHandover(t *testing.T) {
	st := testStore(t)
	_, top := addPair(t, st)
	_, target, opts := memTarget(t)
	queue := filepath.Join(t.TempDir(), "queue")
	old, err := NewPusher(t.Context(), st, target, opts, queue, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := old.Enqueue(t.Context(), top.Path); err != nil {
		t.Fatal(err)
	}
	next, err := NewPusher(t.Context(), st, target, opts, queue, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(next.held) != 1 {
		t.Fatalf("the new pusher holds %d queued paths, want 1", len(next.held))
	}
	if err := old.pushQueued(t.Context()); err != nil { // while it drains
		t.Fatal(err)
	}
	if err := next.pushQueued(t.Context()); err != nil { // its first round, once the old one is gone
		t.Fatal(err)
	}
	if len(next.held) != 0 {
		t.Errorf("the new pusher still holds %d paths the old one pushed", len(next.held))
	}
}

// memTarget serves a memCache over HTTP until the test ends, and opens it
// as a push target.
func memTarget(t *testing.T) (*memCache, Target, Options) {
	t.Helper()
	mc := &memCache{files: map[string][]byte{}}
	srv := httptest.NewServer(mc)
	t.Cleanup(srv.Close)
	target, opts, err := OpenTarget(t.Context(), srv.URL+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	return mc, target, opts
}
