package metrics

import (
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	if rec.Code != 200 {
		t.Fatalf("scrape: %d %s", rec.Code, body)
	}
	return string(body)
}

func wantLines(t *testing.T, text string, lines ...string) {
	t.Helper()
	have := map[string]bool{}
	for _, l := range strings.Split(text, "\n") {
		have[l] = true
	}
	for _, l := range lines {
		if !have[l] {
			t.Errorf("no line %q in:\n%s", l, text)
		}
	}
}

func TestMetrics(t *testing.T) {
	m := New(func(context.Context) (uint64, uint64, error) { return 3, 4096, nil })
	a := m.Conn("ci", "untrusted")
	b := m.Conn("", "trusted")
	a.Op("AddToStore", time.Millisecond, nil)
	a.Op("AddToStore", time.Millisecond, errors.New("refused"))
	b.Op("QueryPathInfo", 100*time.Microsecond, nil)
	b.Close()
	m.BuildStarted(false)
	m.BuildStarted(true)
	m.BuildEnded(true, "ok", 2*time.Second)
	m.Fetched(1000, nil)
	m.Fetched(500, errors.New("404"))
	m.Pushed()
	m.PushQueue(func() int { return 5 })
	m.AutoGC(2048, nil)
	m.AutoGC(0, errors.New("disk"))
	m.Jobs(func() int { return 2 })
	wantLines(t, scrape(t, m),
		`nixyard_connections_total{tenant="ci",trust="untrusted"} 1`,
		`nixyard_connections_total{tenant="",trust="trusted"} 1`,
		`nixyard_connections_open{tenant="ci"} 1`,
		`nixyard_connections_open{tenant=""} 0`,
		`nixyard_ops_total{op="AddToStore",tenant="ci"} 2`,
		`nixyard_op_errors_total{op="AddToStore",tenant="ci"} 1`,
		`nixyard_ops_total{op="QueryPathInfo",tenant=""} 1`,
		`nixyard_op_duration_seconds_count{op="AddToStore"} 2`,
		`nixyard_builds_running{where="local"} 1`,
		`nixyard_builds_running{where="remote"} 0`,
		`nixyard_builds_total{result="ok",where="remote"} 1`,
		`nixyard_substitutions_total{result="ok"} 1`,
		`nixyard_substitutions_total{result="failed"} 1`,
		`nixyard_substituted_nar_bytes_total 1000`,
		`nixyard_pushed_paths_total 1`,
		`nixyard_push_queue_paths 5`,
		`nixyard_auto_gc_runs_total{result="ok"} 1`,
		`nixyard_auto_gc_runs_total{result="failed"} 1`,
		`nixyard_auto_gc_freed_bytes_total 2048`,
		`nixyard_jobs_live 2`,
		`nixyard_store_paths 3`,
		`nixyard_store_nar_bytes 4096`,
	)
}

// TestNil: a nil *Metrics, and the nil *Conn it gives, count nothing and
// do not fail.
func TestNil(t *testing.T) {
	var m *Metrics
	c := m.Conn("x", "trusted")
	c.Op("QueryPathInfo", time.Millisecond, nil)
	c.Close()
	m.BuildStarted(true)
	m.BuildEnded(true, "failed", time.Second)
	m.Fetched(1, nil)
	m.Pushed()
	m.PushQueue(func() int { return 0 })
}

// TestStoreError: a store that cannot say its size leaves its metrics out
// of the scrape, and only those.
func TestStoreError(t *testing.T) {
	m := New(func(context.Context) (uint64, uint64, error) { return 0, 0, errors.New("database is locked") })
	m.Fetched(7, nil)
	text := scrape(t, m)
	wantLines(t, text, `nixyard_substituted_nar_bytes_total 7`)
	if strings.Contains(text, "nixyard_store_paths ") {
		t.Errorf("store size served though the store failed:\n%s", text)
	}
}
