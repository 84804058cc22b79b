package app_test

// Outages (issue 13): a server that restarts or fails over under running replicas.

import (
	"context"
	"os"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

// startCluster starts a throwaway cluster, stopped at cleanup; it skips the test only when the
// server binaries are missing and LANES_TEST_REQUIRE_DB is not 1.
func startCluster(t *testing.T) *pgcluster.Cluster {
	t.Helper()
	if _, err := pgcluster.FindBinaries(); err != nil {
		if os.Getenv("LANES_TEST_REQUIRE_DB") == "1" {
			t.Fatalf("this test needs a throwaway cluster: %v", err)
		}
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	c, err := pgcluster.Start(ctx, pgcluster.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Error(err)
		}
	})
	return c
}

// clusterEnv is an env on a throwaway cluster's postgres database.
func clusterEnv(t *testing.T, c *pgcluster.Cluster) *env {
	url := c.ConnString("postgres")
	cc, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, url: url, cc: cc}
}

// A background lane cut by a crash of its server is tried again as soon as the replica's
// listener is back on the restarted server, not after the retry backoff it grew during the
// outage: here that backoff is ten hours, so on the old code the lane never finished. The
// listener logs the lost connection and its return (with how long it was gone) as a warning
// and an info line; nothing of the outage is logged as an error.
func TestLaneRetriedWhenTheListenerIsBack(t *testing.T) {
	t.Parallel()
	c := startCluster(t)
	e := clusterEnv(t, c)
	g := newGate()
	var log logbuf.Buffer
	r := e.runtimeWith(func(cfg *app.Config) {
		cfg.Logger = zerolog.New(&log)
		cfg.RetryMin, cfg.RetryMax = 10*time.Hour, 10*time.Hour
	}, fastLane, slowLane(g))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitStarted(t, g)
	if err := c.Kill(); err != nil { // a crash: every session ends without a word
		t.Fatal(err)
	}
	close(g.release) // the running migration's next statement finds its connection gone
	testkit.Eventually(t, "the lane interrupted by the crash", 2*time.Minute, func() bool {
		return strings.Contains(log.String(), "background lane interrupted by a transient error")
	})
	if err := c.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	done, err := r.Done("slow")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(2 * time.Minute): // a hang guard: the backoff alone would take hours
		t.Fatalf("the slow lane was not applied after the server came back (runs %d):\n%s", g.runs.Load(), log.String())
	}
	if n := g.runs.Load(); n != 2 {
		t.Errorf("the slow migration ran %d times, want 2 (cut by the crash, then again)", n)
	}
	logs := log.String()
	for _, want := range []string{`"level":"warn","component":"notifier"`, "notification connection lost", "notification connection back", `"down_s":`} {
		if !strings.Contains(logs, want) {
			t.Errorf("the log does not say %q:\n%s", want, logs)
		}
	}
	if strings.Contains(logs, `"level":"error"`) {
		t.Errorf("a transient outage was logged as an error:\n%s", logs)
	}
}

// A replica pointed at a hot standby with a background lane pending says that the server is
// read-only, in recovery: in its view (and /lanes), in Status, and once in its log; the lane
// is applied as soon as the standby is promoted. Before, the lane stayed pending with no word
// of why.
func TestReadOnlyServerIsReportedAndTheLaneAppliedOnPromotion(t *testing.T) {
	t.Parallel()
	primary := startCluster(t)
	// The fast lane is applied on the primary; the standby replays it.
	pe := clusterEnv(t, primary)
	m, err := migrator.New(pe.cc, []migrator.Lane{fastLane, sqlSlowLane}, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Migrate(t.Context(), "fast"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	standby := pgtest.StartStandby(t, primary, 2*time.Minute)
	se := clusterEnv(t, standby)
	var log logbuf.Buffer
	r := se.runtimeWith(func(cfg *app.Config) { cfg.Logger = zerolog.New(&log) }, fastLane, sqlSlowLane)
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the replica sees the server read-only", 2*time.Minute, func() bool {
		return r.View().ReadOnly != nil
	})
	ro := r.View().ReadOnly
	if !ro.InRecovery || !strings.Contains(ro.Reason, "in recovery") {
		t.Errorf("read-only view = %+v, want in recovery", ro)
	}
	st, err := r.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Server != "read-only (in recovery: a hot standby)" || st.Replica.ReadOnly == nil {
		t.Errorf("Status says server %q, replica read-only %v; want read-only in recovery", st.Server, st.Replica.ReadOnly)
	}
	if r.IsDone("slow") {
		t.Fatal("the slow lane is done on a standby")
	}
	// The lane is tried again with backoff meanwhile (20-200 ms here): the log says it once.
	testkit.Eventually(t, "the replica retries", 2*time.Minute, func() bool {
		return strings.Count(log.String(), `"level":"warn"`) >= 1 && time.Since(ro.Since) > time.Second
	})
	if n := strings.Count(log.String(), "the server is read-only"); n != 1 {
		t.Errorf("the log says %d times that the server is read-only, want once:\n%s", n, log.String())
	}
	if err := standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	done, err := r.Done("slow")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(2 * time.Minute): // a hang guard
		t.Fatalf("the slow lane was not applied after the promotion:\n%s", log.String())
	}
	// The replica forgets that the server was read-only when its attempt succeeds, which may
	// be just after the lane's completion reached it through its listener.
	testkit.Eventually(t, "the view no longer says read-only", time.Minute, func() bool { return r.View().ReadOnly == nil })
	if st, err := r.Status(ctx); err != nil || st.Server != "writable" {
		t.Errorf("Status after the promotion: server %q, %v; want writable", st.Server, err)
	}
	if !strings.Contains(log.String(), "the server takes writes again") {
		t.Errorf("the log does not say the server takes writes again:\n%s", log.String())
	}
	if strings.Contains(log.String(), `"level":"error"`) {
		t.Errorf("a read-only server was logged as an error:\n%s", log.String())
	}
}

var sqlSlowLane = migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{
	"001_t.sql": testkit.File("create table slow_t (i int);"),
}}

// TestStartWaitsThroughASlowServer: with WaitForDatabase, a listener start that runs out of its
// own time (Notifier.ConnectTimeout bounds its connect, LISTEN and probe: a server, or a machine,
// too loaded to answer in time) is tried again like a refused connection, and Start returns once
// the server answers. Here the server is silent behind a proxy that forwards nothing, then
// answers. On the old code Start returned the deadline error at once, and `lanes serve` exited
// at start-up under heavy load (a thousand replicas starting at load 40-70 failed with "notifier:
// probe: timeout: context deadline exceeded").
func TestStartWaitsThroughASlowServer(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cc, proxy := e.proxied()
	proxy.SetBlackhole(true)
	m, err := migrator.New(cc, []migrator.Lane{fastLane}, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	var logs logbuf.Buffer
	r, err := app.New(m, app.Config{Logger: zerolog.New(&logs), WaitForDatabase: true, Notifier: notifier.Config{ConnectTimeout: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute) // a hang guard
	defer cancel()
	started := make(chan error, 1)
	go func() { started <- r.Start(ctx) }()
	testkit.Eventually(t, "Start to say it waits for a usable database", time.Minute, func() bool {
		select {
		case err := <-started:
			t.Fatalf("Start returned while the server was silent: %v", err)
		default:
		}
		return strings.Contains(logs.String(), "no usable database yet")
	})
	if r.Ready() {
		t.Fatal("ready while the server is silent")
	}
	proxy.SetBlackhole(false)
	select {
	case err := <-started:
		if err != nil {
			t.Fatalf("Start once the server answers: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("Start did not return once the server answered")
	}
	if !r.Ready() || !r.IsDone("fast") {
		t.Fatalf("after Start: ready %v, fast done %v", r.Ready(), r.IsDone("fast"))
	}
}
