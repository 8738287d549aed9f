package bench

// Pieces of the substitution scenario: a counting HTTP server for binary
// caches written by `nix copy --to file://…`, a per-run environment whose
// nix.conf points the daemons at it, and a `nix-store -r` client run.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// CacheServer serves a binary cache directory over HTTP on 127.0.0.1 and
// counts what it serves, so a benchmark can tell how often each NAR was
// downloaded. Its methods are safe for concurrent use.
type CacheServer struct {
	URL string // e.g. http://127.0.0.1:41234
	Dir string

	srv *http.Server
	ln  net.Listener

	mu    sync.Mutex
	stats CacheStats
	gets  map[string]int // GETs per nar/… file
	reset time.Time      // of the last Reset (or the start)
}

// CacheStats counts the requests a CacheServer answered since the last Reset.
type CacheStats struct {
	NarGets     int   // GET requests for nar/… files
	NarFiles    int   // distinct nar/… files requested with GET
	MaxNarGets  int   // most GETs of any one nar/… file
	NarBytes    int64 // body bytes sent for nar/… files
	NarinfoGets int   // GET requests for *.narinfo
	Heads       int   // HEAD requests
	Bytes       int64 // body bytes sent in all
	// Since the last Reset: when the first narinfo GET came, when the
	// first NAR GET came, and when the last NAR body was sent.
	FirstNarinfo, FirstNar, LastNarDone time.Duration
}

// ServeCache starts serving dir on a free loopback port until Close.
func ServeCache(dir string) (*CacheServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("cache server: %w", err)
	}
	s := &CacheServer{URL: "http://" + ln.Addr().String(), Dir: dir, ln: ln, gets: map[string]int{}, reset: time.Now()}
	s.srv = &http.Server{Handler: http.HandlerFunc(s.serve), ReadHeaderTimeout: 30 * time.Second}
	go s.srv.Serve(ln)
	return s, nil
}

// Close stops the server and closes its connections.
func (s *CacheServer) Close() error { return s.srv.Close() }

// Reset zeroes the counters.
func (s *CacheServer) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stats = CacheStats{}
	s.gets = map[string]int{}
	s.reset = time.Now()
}

// Stats returns the counters since the last Reset.
func (s *CacheServer) Stats() CacheStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.NarFiles = len(s.gets)
	for _, n := range s.gets {
		st.MaxNarGets = max(st.MaxNarGets, n)
	}
	return st
}

func (s *CacheServer) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		http.Error(w, "read-only", http.StatusMethodNotAllowed)
		return
	}
	p := strings.TrimPrefix(path.Clean(r.URL.Path), "/")
	isNar := strings.HasPrefix(p, "nar/")
	s.mu.Lock()
	switch {
	case r.Method == http.MethodHead:
		s.stats.Heads++
	case isNar:
		if s.stats.NarGets == 0 {
			s.stats.FirstNar = time.Since(s.reset)
		}
		s.stats.NarGets++
		s.gets[p]++
	case strings.HasSuffix(p, ".narinfo"):
		if s.stats.NarinfoGets == 0 {
			s.stats.FirstNarinfo = time.Since(s.reset)
		}
		s.stats.NarinfoGets++
	}
	s.mu.Unlock()
	if !filepath.IsLocal(p) {
		http.NotFound(w, r)
		return
	}
	f, err := os.Open(filepath.Join(s.Dir, p))
	if err != nil {
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.IsDir() {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Length", fmt.Sprint(fi.Size()))
	w.Header().Set("Content-Type", "application/octet-stream")
	if r.Method == http.MethodHead {
		return
	}
	n, _ := io.Copy(w, f)
	s.mu.Lock()
	s.stats.Bytes += n
	if isNar {
		s.stats.NarBytes += n
		s.stats.LastNarDone = time.Since(s.reset)
	}
	s.mu.Unlock()
}

// NewSubstEnv is NewEnv with a nix.conf that makes cacheURL the only
// substituter and accepts unsigned paths. A fresh one per daemon start gives
// the daemon (and its clients) empty narinfo disk caches.
func NewSubstEnv(work, cacheURL string) (*Env, error) {
	return NewEnv(work, "substituters = "+cacheURL, "require-sigs = false")
}

// Realise runs `nix-store --store storeURL -r paths…` in env with its own
// fresh XDG_CACHE_HOME under cacheDir (created), and returns its wall and
// CPU time.
func Realise(ctx context.Context, env *Env, storeURL, cacheDir string, paths []string) (ClientRun, error) {
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return ClientRun{}, fmt.Errorf("creating client cache: %w", err)
	}
	args := append([]string{"--store", storeURL, "-r"}, paths...)
	run, err := RunClient(ctx, env, []string{"XDG_CACHE_HOME=" + cacheDir}, "nix-store", args...)
	if err != nil {
		return run, fmt.Errorf("nix-store -r of %d paths: %w", len(paths), err)
	}
	return run, nil
}

// Roots returns the paths of infos that no other path references: their
// closure is the whole set.
func Roots(infos []PathInfo) []string {
	referenced := map[string]bool{}
	for _, p := range infos {
		for _, r := range p.Refs {
			if r != p.Path {
				referenced[r] = true
			}
		}
	}
	var out []string
	for _, p := range infos {
		if !referenced[p.Path] {
			out = append(out, p.Path)
		}
	}
	slices.Sort(out)
	return out
}

// Section markers of the substitution results in docs/benchmarks.md.
const (
	SubstSectionBegin = "<!-- substitution results: begin (generated by scripts/bench.sh) -->"
	SubstSectionEnd   = "<!-- substitution results: end -->"
)

// RewriteSubstSection replaces the text between SubstSectionBegin and
// SubstSectionEnd in the file at path with body. The markers must exist.
func RewriteSubstSection(path, body string) error {
	old, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	s := string(old)
	i := strings.Index(s, SubstSectionBegin)
	j := strings.Index(s, SubstSectionEnd)
	if i < 0 || j < i {
		return errors.New(path + ": no substitution results markers")
	}
	s = s[:i] + SubstSectionBegin + "\n" + strings.TrimSpace(body) + "\n" + s[j:]
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// cpuacctRoot is where the cgroup-v1 cpuacct hierarchy is mounted.
const cpuacctRoot = "/sys/fs/cgroup/cpuacct"

// CPUGroup measures the CPU time (user and system) of a process and of
// every process it starts after being added, through a cgroup-v1 cpuacct
// group. The stock daemon does not wait for its per-connection processes,
// so their times never reach its own /proc counters; a cgroup counts them,
// and a process's CPU time is a measure the other work on a shared machine
// disturbs far less than wall time.
type CPUGroup struct{ dir string }

// NewCPUGroup creates an empty group named name (unique on the machine).
// It fails where cpuacct is not mounted (e.g. cgroup v2 only).
func NewCPUGroup(name string) (*CPUGroup, error) {
	dir := filepath.Join(cpuacctRoot, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating cpuacct group: %w", err)
	}
	return &CPUGroup{dir: dir}, nil
}

// Add moves the process pid into the group.
func (g *CPUGroup) Add(pid int) error {
	if err := os.WriteFile(filepath.Join(g.dir, "cgroup.procs"), []byte(fmt.Sprint(pid)), 0o644); err != nil {
		return fmt.Errorf("adding pid %d to %s: %w", pid, g.dir, err)
	}
	return nil
}

// Usage returns the CPU time the group's processes have used so far.
func (g *CPUGroup) Usage() (time.Duration, error) {
	b, err := os.ReadFile(filepath.Join(g.dir, "cpuacct.usage"))
	if err != nil {
		return 0, fmt.Errorf("reading CPU usage: %w", err)
	}
	var ns int64
	if _, err := fmt.Sscan(string(b), &ns); err != nil {
		return 0, fmt.Errorf("%s/cpuacct.usage: %w", g.dir, err)
	}
	return time.Duration(ns), nil
}

// Close removes the group; its processes must have exited.
func (g *CPUGroup) Close() error {
	if err := os.Remove(g.dir); err != nil {
		return fmt.Errorf("removing cpuacct group: %w", err)
	}
	return nil
}

// PID is the daemon's process id.
func (d *Daemon) PID() int { return d.cmd.Process.Pid }
