package app_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// scrape serves h's /metrics and parses it with the Prometheus text parser.
func scrape(t *testing.T, h http.Handler) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(h)
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("/metrics: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// userRegistry scrapes the runtime's Collector registered in a registry of the test's own, as a
// library user would, with the pedantic checks (descriptions match what is collected).
func userRegistry(t *testing.T, r *app.Runtime) map[string]*dto.MetricFamily {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(r.Collector())
	return scrape(t, promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError}))
}

// value returns the value of the family's series whose labels include labels (name, value
// pairs), and whether there is one. For a histogram it is the sample count.
func value(fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		}
	}
	return 0, false
}

type want struct {
	name   string
	labels []string
	cmp    string // "=" or ">"
	v      float64
}

func check(t *testing.T, who string, fams map[string]*dto.MetricFamily, wants []want) {
	t.Helper()
	for _, w := range wants {
		got, ok := value(fams, w.name, w.labels...)
		switch {
		case !ok:
			t.Errorf("%s: no series %s%v", who, w.name, w.labels)
		case w.cmp == "=" && got != w.v, w.cmp == ">" && got <= w.v:
			t.Errorf("%s: %s%v = %v, want %s %v", who, w.name, w.labels, got, w.cmp, w.v)
		}
	}
}

func TestMetricsAfterATakeover(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	a := e.replica(fastLane, slowLane(g))
	waitStarted(t, g)

	// Before b exists: a's lanes as a applies the slow lane.
	check(t, "a while applying", userRegistry(t, a), []want{
		{"lanes_lane_version", []string{"lane", "fast"}, "=", 2},
		{"lanes_lane_latest_version", []string{"lane", "slow"}, "=", 2},
		{"lanes_lane_done", []string{"lane", "fast"}, "=", 1},
		{"lanes_lane_done", []string{"lane", "slow"}, "=", 0},
		{"lanes_lane_state", []string{"lane", "slow", "state", "done"}, "=", 0},
		{"lanes_lane_state", []string{"lane", "fast", "state", "done"}, "=", 1},
		{"lanes_ready", nil, "=", 1},
		{"lanes_migrations_applied_total", []string{"lane", "fast"}, "=", 2},
		{"lanes_migrations_applied_total", []string{"lane", "slow"}, "=", 0},
		{"lanes_migration_duration_seconds", []string{"lane", "fast"}, "=", 2},
		{"lanes_listener_mode", []string{"mode", "listening"}, "=", 1},
		{"lanes_listener_mode", []string{"mode", "polling"}, "=", 0},
	})

	b := e.replica(fastLane, slowLane(g))
	testkit.Eventually(t, "b waits for a's slow lane", 20*time.Second, func() bool {
		for _, k := range b.View().Lanes {
			if k.Name == "slow" && k.Role == "waiting" {
				return true
			}
		}
		return false
	})
	check(t, "b while waiting", userRegistry(t, b), []want{
		{"lanes_lane_state", []string{"lane", "slow", "state", "running"}, "=", 1},
		{"lanes_lane_locked", []string{"lane", "slow"}, "=", 1},
		{"lanes_takeovers_total", []string{"lane", "slow"}, "=", 0},
	})

	// a stops halfway: its migration rolls back and b takes the lane over.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	waitStarted(t, g)
	close(g.release)
	waitDone(t, b, "slow")

	// b's background goroutine counts after its migrator call returns, which may be after the
	// notification that closed Done: wait for the counters, then check everything at once.
	h := b.Handler()
	testkit.Eventually(t, "b counts its takeover and migrations", 10*time.Second, func() bool {
		m := scrape(t, h)
		tk, _ := value(m, "lanes_takeovers_total", "lane", "slow")
		ap, _ := value(m, "lanes_migrations_applied_total", "lane", "slow")
		return tk >= 1 && ap >= 2
	})
	// b through its own handler, as `lanes serve` serves it.
	bm := scrape(t, h)
	check(t, "b after the takeover", bm, []want{
		{"lanes_takeovers_total", []string{"lane", "slow"}, "=", 1},
		{"lanes_lock_wait_seconds_total", []string{"lane", "slow"}, ">", 0},
		{"lanes_migrations_applied_total", []string{"lane", "slow"}, "=", 2},
		{"lanes_migrations_applied_total", []string{"lane", "fast"}, "=", 0},
		{"lanes_migrations_failed_total", []string{"lane", "slow"}, "=", 0},
		{"lanes_migration_duration_seconds", []string{"lane", "slow"}, "=", 2},
		{"lanes_lane_version", []string{"lane", "slow"}, "=", 2},
		{"lanes_lane_done", []string{"lane", "slow"}, "=", 1},
		{"lanes_lane_state", []string{"lane", "slow", "state", "done"}, "=", 1},
		{"lanes_lane_state", []string{"lane", "slow", "state", "running"}, "=", 0},
		{"lanes_lane_locked", []string{"lane", "slow"}, "=", 0},
		{"lanes_notifications_received_total", nil, ">", 0},
		{"lanes_listener_reconnects_total", nil, "=", 0},
		{"lanes_batches_throttled_total", []string{"lane", "slow"}, "=", 0},
		{"lanes_batch_duration_seconds", []string{"lane", "slow"}, "=", 0},
	})
	if _, ok := bm["go_goroutines"]; !ok {
		t.Error("/metrics has no Go runtime metrics")
	}
	check(t, "a after Close", userRegistry(t, a), []want{
		{"lanes_migrations_failed_total", []string{"lane", "slow"}, "=", 1},
		{"lanes_migrations_applied_total", []string{"lane", "slow"}, "=", 0},
		{"lanes_migration_duration_seconds", []string{"lane", "slow"}, "=", 1},
		{"lanes_listener_mode", []string{"mode", "stopped"}, "=", 1},
	})

	// Nothing went to the global registry.
	fams, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if strings.HasPrefix(f.GetName(), "lanes_") {
			t.Errorf("%s is in the global registry", f.GetName())
		}
	}
}

func TestMetricsOfABatchedMigration(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec("create table items (id int8 primary key, n int not null default 0); insert into items (id) select generate_series(1, 50); analyze items")
	var calls atomic.Int32
	first, release := make(chan struct{}), make(chan struct{})
	walk := func(ctx context.Context, tx pgx.Tx, lo, hi int64) error {
		if calls.Add(1) == 2 { // batch 1 has committed
			close(first)
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		_, err := tx.Exec(ctx, "update items set n = n + 1 where id > $1 and id <= $2", lo, hi)
		return err
	}
	slow := migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{
		{Version: 1, Name: "visit", Backfill: &migrator.Backfill{Table: "items", Key: "id", Size: 10, Range: walk}}}}
	r := e.replica(fastLane, slow)
	<-first
	testkit.Eventually(t, "the replica learns the first batch's progress", 10*time.Second, func() bool {
		p := r.Progress("slow")
		return p != nil && p.Done == 10
	})
	check(t, "during the walk", userRegistry(t, r), []want{
		{"lanes_backfill_rows_done", []string{"lane", "slow", "version", "1"}, "=", 10},
		{"lanes_backfill_rows_total", []string{"lane", "slow", "version", "1"}, "=", 50},
		{"lanes_batch_duration_seconds", []string{"lane", "slow"}, "=", 1},
		{"lanes_lane_state", []string{"lane", "slow", "state", "running"}, "=", 1},
		{"lanes_lane_paused", []string{"lane", "slow"}, "=", 0},
	})
	close(release)
	waitDone(t, r, "slow")
	testkit.Eventually(t, "the migration counted", 10*time.Second, func() bool {
		v, _ := value(userRegistry(t, r), "lanes_migrations_applied_total", "lane", "slow")
		return v == 1
	})
	m := userRegistry(t, r)
	check(t, "after the walk", m, []want{
		{"lanes_batch_duration_seconds", []string{"lane", "slow"}, ">", 1},
		{"lanes_batches_throttled_total", []string{"lane", "slow"}, "=", 0},
		{"lanes_lane_state", []string{"lane", "slow", "state", "done"}, "=", 1},
	})
	if _, ok := m["lanes_backfill_rows_done"]; ok {
		t.Error("lanes_backfill_rows_done still exported after the walk")
	}
}
