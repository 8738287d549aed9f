// Package metrics holds the daemon's Prometheus metrics: connections and
// operations per tenant, builds here and on remote machines, downloads
// from binary caches, and the store's size, with Go's and the process's
// own. The daemon serves them over HTTP (nixyard daemon --metrics-listen).
//
// Everything is safe for concurrent use, and the methods of a nil
// *Metrics do nothing, so that code paths need no check of their own.
package metrics

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// StoreStats reports the store's valid paths and the sum of their NAR
// sizes, read when metrics are scraped.
type StoreStats func(ctx context.Context) (paths, narBytes uint64, err error)

// Metrics are the daemon's metrics and the registry that serves them.
type Metrics struct {
	reg *prometheus.Registry

	connections *prometheus.CounterVec // tenant, trust
	open        *prometheus.GaugeVec   // tenant
	ops         *prometheus.CounterVec // op, tenant
	opErrors    *prometheus.CounterVec // op, tenant
	opSeconds   *prometheus.HistogramVec
	builds      *prometheus.CounterVec // where, result
	running     *prometheus.GaugeVec   // where
	buildSecs   *prometheus.HistogramVec
	fetches     *prometheus.CounterVec // result
	fetchedNar  prometheus.Counter
	pushed      prometheus.Counter
	autoGCs     *prometheus.CounterVec // result
	autoGCBytes prometheus.Counter
}

// New makes the metrics; stats, if not nil, is asked for the store's
// size at each scrape.
func New(stats StoreStats) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	tenant := []string{"tenant"}
	m.connections = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixyard_connections_total",
		Help: "Client connections, by tenant (\"\" for the host's own sockets) and trust (trusted, untrusted or refused).",
	}, []string{"tenant", "trust"})
	m.open = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "nixyard_connections_open",
		Help: "Client connections open now, by tenant.",
	}, tenant)
	m.ops = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixyard_ops_total",
		Help: "Worker-protocol operations served, by operation and tenant.",
	}, []string{"op", "tenant"})
	m.opErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixyard_op_errors_total",
		Help: "Worker-protocol operations that ended with an error, by operation and tenant.",
	}, []string{"op", "tenant"})
	m.opSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "nixyard_op_duration_seconds",
		Help:    "Time from an operation's request being read to its reply being sent, by operation.",
		Buckets: prometheus.ExponentialBuckets(5e-6, 4, 13), // 5 µs to ~84 s
	}, []string{"op"})
	m.builds = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixyard_builds_total",
		Help: "Builds run, by where they ran (local or remote) and result (ok, failed, or cancelled: stopped when every client waiting for it had gone).",
	}, []string{"where", "result"})
	m.running = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "nixyard_builds_running",
		Help: "Builds running now, here (local) or on remote builders (remote).",
	}, []string{"where"})
	m.buildSecs = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "nixyard_build_duration_seconds",
		Help:    "Time builds ran, by where they ran.",
		Buckets: prometheus.ExponentialBuckets(0.1, 3, 10), // 0.1 s to ~33 min
	}, []string{"where"})
	m.fetches = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixyard_substitutions_total",
		Help: "Paths fetched from binary caches (once however many clients wait, after every cache was tried), by result (ok or failed).",
	}, []string{"result"})
	m.fetchedNar = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nixyard_substituted_nar_bytes_total",
		Help: "NAR bytes of the paths fetched from binary caches.",
	})
	m.pushed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nixyard_pushed_paths_total",
		Help: "Paths written to the fleet cache (--push-to), each with its NAR.",
	})
	m.autoGCs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixyard_auto_gc_runs_total",
		Help: "Automatic collections (min-free, --size-budget), by result (ok, failed).",
	}, []string{"result"})
	m.autoGCBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nixyard_auto_gc_freed_bytes_total",
		Help: "Bytes the automatic collections freed.",
	})
	m.reg.MustRegister(m.connections, m.open, m.ops, m.opErrors, m.opSeconds, m.builds, m.running, m.buildSecs, m.fetches, m.fetchedNar,
		m.autoGCs, m.autoGCBytes,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if stats != nil {
		m.reg.MustRegister(&storeCollector{stats: stats})
	}
	return m
}

// Handler serves the metrics in Prometheus's text format. A metric that
// cannot be read (the store's size, when its database fails) is left out;
// the others are served.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError, MaxRequestsInFlight: 4, Timeout: 30 * time.Second})
}

// Conn counts a connection in, with its trust ("trusted", "untrusted" or
// "refused"); the returned Conn counts its operations and must be closed
// when the connection ends.
func (m *Metrics) Conn(tenant, trust string) *Conn {
	if m == nil {
		return nil
	}
	m.connections.WithLabelValues(tenant, trust).Inc()
	open := m.open.WithLabelValues(tenant)
	open.Inc()
	return &Conn{m: m, tenant: tenant, open: open}
}

// Conn is one connection's view of the metrics: its operations' counters,
// looked up once per operation kind.
type Conn struct {
	m      *Metrics
	tenant string
	open   prometheus.Gauge
	mu     sync.Mutex
	byOp   map[string]*opMetrics
}

type opMetrics struct {
	n, errs prometheus.Counter
	secs    prometheus.Observer
}

// Op counts an operation named op that took d, failed if err is not nil.
func (c *Conn) Op(op string, d time.Duration, err error) {
	if c == nil {
		return
	}
	c.mu.Lock()
	o := c.byOp[op]
	if o == nil {
		if c.byOp == nil {
			c.byOp = map[string]*opMetrics{}
		}
		o = &opMetrics{n: c.m.ops.WithLabelValues(op, c.tenant), errs: c.m.opErrors.WithLabelValues(op, c.tenant), secs: c.m.opSeconds.WithLabelValues(op)}
		c.byOp[op] = o
	}
	c.mu.Unlock()
	o.n.Inc()
	if err != nil {
		o.errs.Inc()
	}
	o.secs.Observe(d.Seconds())
}

// Close counts the connection out.
func (c *Conn) Close() {
	if c != nil {
		c.open.Dec()
	}
}

func where(remote bool) string {
	if remote {
		return "remote"
	}
	return "local"
}

// BuildStarted counts a build that starts, here or on a remote machine.
func (m *Metrics) BuildStarted(remote bool) {
	if m != nil {
		m.running.WithLabelValues(where(remote)).Inc()
	}
}

// BuildEnded counts a build that ended after d, with result "ok" (its
// outputs registered), "failed", or "cancelled" (stopped because no client
// waited for it any more: a cancelled job's).
func (m *Metrics) BuildEnded(remote bool, result string, d time.Duration) {
	if m == nil {
		return
	}
	w := where(remote)
	m.running.WithLabelValues(w).Dec()
	m.builds.WithLabelValues(w, result).Inc()
	m.buildSecs.WithLabelValues(w).Observe(d.Seconds())
}

// Fetched counts a path fetched from a binary cache, of narSize bytes of
// NAR, or a fetch that failed with err.
func (m *Metrics) Fetched(narSize uint64, err error) {
	if m != nil {
		countResult(m.fetches, m.fetchedNar, narSize, err)
	}
}

// countResult counts an event that ended with err in results (by result:
// ok, failed), and the bytes it moved, if it succeeded, in bytes.
func countResult(results *prometheus.CounterVec, bytes prometheus.Counter, n uint64, err error) {
	if err != nil {
		results.WithLabelValues("failed").Inc()
		return
	}
	results.WithLabelValues("ok").Inc()
	bytes.Add(float64(n))
}

// Pushed counts a path written to the fleet cache.
func (m *Metrics) Pushed() {
	if m != nil {
		m.pushed.Inc()
	}
}

// PushQueue makes queued report the paths waiting to be pushed, read at
// each scrape, and the pushed paths counted: the daemon pushes (only then
// are these metrics there).
func (m *Metrics) PushQueue(queued func() int) {
	if m == nil {
		return
	}
	m.reg.MustRegister(m.pushed, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "nixyard_push_queue_paths",
		Help: "Paths waiting to be pushed to the fleet cache (--push-to), those set aside included.",
	}, func() float64 { return float64(queued()) }))
}

// AutoGC counts an automatic collection that freed freed bytes (err: it
// failed).
func (m *Metrics) AutoGC(freed uint64, err error) {
	if m != nil {
		countResult(m.autoGCs, m.autoGCBytes, freed, err)
	}
}

// BuildsWaiting makes waiting report the builds waiting for a build slot
// (max-jobs), read at each scrape: with builds_running, how busy the
// host's builders are and how far behind.
func (m *Metrics) BuildsWaiting(waiting func() int) {
	if m == nil {
		return
	}
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "nixyard_builds_waiting",
		Help: "Builds waiting now for one of the host's build slots (max-jobs).",
	}, func() float64 { return float64(waiting()) }))
}

// Jobs makes live report the live job sessions, read at each scrape.
func (m *Metrics) Jobs(live func() int) {
	if m == nil {
		return
	}
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "nixyard_jobs_live",
		Help: "Live job sessions: CI jobs whose paths are held until they end.",
	}, func() float64 { return float64(live()) }))
}

// storeCollector reads the store's size when scraped.
type storeCollector struct{ stats StoreStats }

var (
	storePathsDesc = prometheus.NewDesc("nixyard_store_paths", "Valid paths in the store.", nil, nil)
	storeBytesDesc = prometheus.NewDesc("nixyard_store_nar_bytes", "Sum of the NAR sizes of the store's valid paths.", nil, nil)
)

func (s *storeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- storePathsDesc
	ch <- storeBytesDesc
}

func (s *storeCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	paths, bytes, err := s.stats(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(storePathsDesc, err)
		return
	}
	ch <- prometheus.MustNewConstMetric(storePathsDesc, prometheus.GaugeValue, float64(paths))
	ch <- prometheus.MustNewConstMetric(storeBytesDesc, prometheus.GaugeValue, float64(bytes))
}
