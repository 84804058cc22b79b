package app_test

// Outages (issue 13): a server that restarts or fails over under running replicas.

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/testkit"
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
