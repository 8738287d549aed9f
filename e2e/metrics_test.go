package e2e

import (
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMetrics: with --metrics-listen, the daemon serves Prometheus
// metrics: connections and operations by tenant, builds, and the store's
// size as real Nix sees it.
func TestMetrics(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon serves no metrics")
	}
	e := newEnv(t)
	jobSock := filepath.Join(e.dir, "job.sock")
	d := e.startDaemon(t, withDaemonArgs("--metrics-listen", "127.0.0.1:0", "--listen", jobSock+",trusted=false,tenant=ci"))
	metricsURL := d.servedURL(t, "--metrics-listen")

	d.nixStore(t, "--add", e.file(t, "host.txt", "from the host\n"))
	job := "unix://" + jobSock + "?root=" + d.root
	e.cmd("nix-store", "--store", job, "--add", e.file(t, "job.txt", "from a job\n")).ok(t)
	e.cmd("nix-store", "--store", job, "--add", e.file(t, "job2.txt", "from a job again\n")).ok(t)
	args := e.expr(t, "metrics", `{ x = mk { name = "metrics-build"; script = "echo > $out"; }; }`)
	d.nixBuild(append(args, "-A", "x", "--no-out-link")...).ok(t)
	nPaths := len(lines(d.nix(t, "path-info", "--all")))

	var text string
	scrape := func() { text = scrapeMetrics(t, metricsURL) }
	scrape()
	value := func(metric string) float64 {
		t.Helper()
		m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(metric) + ` (\S+)$`).FindStringSubmatch(text)
		if m == nil {
			t.Errorf("no %s in the metrics", metric)
			return -1
		}
		v, _ := strconv.ParseFloat(m[1], 64)
		return v
	}
	if v := value(`nixyard_ops_total{op="AddToStore",tenant="ci"}`); v != 2 {
		t.Errorf("the job's AddToStore: %v, want 2", v)
	}
	if v := value(`nixyard_connections_total{tenant="ci",trust="untrusted"}`); v != 2 {
		t.Errorf("the job's connections: %v, want 2", v)
	}
	// The daemon counts a connection out once it has seen it close.
	for deadline := time.Now().Add(5 * time.Second); value(`nixyard_connections_open{tenant="ci"}`) != 0; {
		if time.Now().After(deadline) {
			t.Fatalf("the job's connections are still counted open:\n%s", text)
		}
		time.Sleep(50 * time.Millisecond)
		scrape()
	}
	if v := value(`nixyard_builds_total{result="ok",where="local"}`); v != 1 {
		t.Errorf("builds: %v, want 1", v)
	}
	if v := value(`nixyard_store_paths`); v != float64(nPaths) {
		t.Errorf("store paths: %v, nix path-info --all lists %d", v, nPaths)
	}
	if v := value(`nixyard_jobs_live`); v != 0 {
		t.Errorf("live jobs: %v, want 0 (no client was in a container)", v)
	}
	if strings.Contains(text, "nixyard_pushed_paths_total") {
		t.Errorf("push metrics without --push-to:\n%s", text)
	}
	if !strings.Contains(text, "go_goroutines ") || !strings.Contains(text, "process_resident_memory_bytes ") {
		t.Errorf("no Go or process metrics:\n%s", text)
	}
}

// servedURL is the URL the daemon logged for its HTTP server of option
// (--metrics-listen or --cache-listen), which listens on a port the
// kernel chose.
func (d *daemon) servedURL(t *testing.T, option string) string {
	t.Helper()
	log, err := os.ReadFile(d.logPath)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`option=` + regexp.QuoteMeta(option) + ` url=(\S+)`).FindSubmatch(log)
	if m == nil {
		t.Fatalf("the daemon logged no URL for %s:\n%s", option, log)
	}
	return string(m[1])
}

// TestUpgradeKeepsHTTPAddresses: a daemon started while the one before
// still drains its connections (an upgrade) starts, though its
// --metrics-listen and --cache-listen addresses are still that daemon's,
// and serves them once it has exited. It failed with "address already in
// use", leaving the store's sockets unserved.
func TestUpgradeKeepsHTTPAddresses(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nixyard's --metrics-listen, --cache-listen and --shutdown-grace")
	}
	metricsAddr, cacheAddr := freeTCPAddr(t), freeTCPAddr(t)
	e := newEnv(t)
	old := e.startDaemon(t, withDaemonArgs("--metrics-listen", metricsAddr, "--cache-listen", cacheAddr, "--shutdown-grace", "1m"))
	draining := dialProto(t, old.sock) // keeps the old daemon draining
	if err := syscall.Kill(old.proc.Process.Pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the old daemon's socket to go", func() bool { _, err := os.Stat(old.sock); return err != nil })
	next := old.successor(t)
	next.start(t)
	next.client("nix", "store", "ping").ok(t)

	draining.c.Close()
	select {
	case <-old.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("the old daemon did not exit once its last connection ended")
	}
	for _, u := range []string{"http://" + metricsAddr + "/metrics", "http://" + cacheAddr + "/nix-cache-info"} {
		waitFor(t, u+" to be served by the new daemon", func() bool {
			resp, err := http.Get(u)
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == http.StatusOK
		})
	}
}

// freeTCPAddr returns an address on 127.0.0.1 that was free a moment ago.
func freeTCPAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestMetricsBuildsWaiting: a build waiting for the host's only build slot
// is counted in nixyard_builds_waiting until it gets it.
func TestMetricsBuildsWaiting(t *testing.T) {
	t.Parallel()
	if useStock {
		t.Skip("nix-daemon serves no metrics")
	}
	e := newEnv(t)
	b := e.startBuildDaemonWith(t, withConf("max-jobs = 1"), withDaemonArgs("--metrics-listen", "127.0.0.1:0"))
	metricsURL := b.servedURL(t, "--metrics-listen")
	args := e.expr(t, "waiting", `{
  hold = mk { name = "waiting-hold"; script = "touch /marks/started; i=0; while [ ! -e /marks/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo > $out"; };
  next = mk { name = "waiting-next"; script = "echo > $out"; };
}`)
	waiting := func() string { return buildsWaiting(t, metricsURL) }
	if w := waiting(); w != "0" {
		t.Fatalf("builds waiting before any build: %s", w)
	}
	done := make(chan result, 2)
	go func() { done <- b.nixBuild(append(args, "-A", "hold", "--no-out-link")...).run(t) }()
	waitFor(t, "the first build to start", func() bool {
		_, err := os.Stat(filepath.Join(b.marks, "started"))
		return err == nil
	})
	go func() { done <- b.nixBuild(append(args, "-A", "next", "--no-out-link")...).run(t) }()
	waitFor(t, "the second build to wait for the slot", func() bool { return waiting() == "1" })
	writeFile(t, filepath.Join(b.marks, "go"), "", 0o644)
	for range 2 {
		if r := <-done; r.err != nil {
			t.Errorf("build failed:\n%s", r)
		}
	}
	if w := waiting(); w != "0" {
		t.Errorf("builds waiting after both ended: %s", w)
	}
}

// buildsWaiting scrapes the daemon's metrics at metricsURL for
// nixyard_builds_waiting.
func buildsWaiting(t *testing.T, metricsURL string) string {
	t.Helper()
	body := scrapeMetrics(t, metricsURL)
	m := regexp.MustCompile(`(?m)^nixyard_builds_waiting (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no nixyard_builds_waiting in the metrics:\n%s", body)
	}
	return m[1]
}

// scrapeMetrics returns the daemon's metrics served at metricsURL.
func scrapeMetrics(t *testing.T, metricsURL string) string {
	t.Helper()
	resp, err := http.Get(metricsURL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return string(body)
}
