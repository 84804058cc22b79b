package main

// Process-level tests of batched migrations (issue 9): real `lanes serve` replicas killed,
// restarted, paused and throttled in the middle of a backfill. Each checks every row is visited
// exactly once (n = n + 1 on every row, then n = 1 everywhere).

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// backfillRows is the size of the table the backfill tests walk.
const backfillRows = 20000

// backfillLanes returns a migrations folder whose fast lane creates items (backfillRows rows
// with even keys) and whose slow lane is a batched file adding one to every row's n, with a
// 20 ms sleep per batch so that the walk lasts a few seconds.
func backfillLanes(t *testing.T) string {
	return testkit.WriteTree(t, map[string]string{
		"fast/001_items.sql": fmt.Sprintf(`create table items (id int8 primary key, n int not null default 0);
insert into items (id) select 2 * g from generate_series(1, %d) g;
analyze items;`, backfillRows),
		"slow/001_visit.sql": `---- lanes: batch table=items key=id size=200 ----
update items set n = n + 1 where id > $1 and id <= $2 and (select pg_sleep(0.02)) is not null;`,
	})
}

// backfillEnv makes the walk take a few seconds whatever the machine: short batches and a
// pause between them. On a loaded machine the sizer shrinks batches to their floor and the walk
// takes a minute or more: the waits for progress and completion below are hang guards of a few
// minutes, not bounds on the machine's speed.
var backfillEnv = []string{"LANES_BATCH_TARGET=50ms", "LANES_BATCH_PAUSE=30ms"}

// walked returns the committed progress of the slow lane's walk (0 before it starts).
func walked(t *testing.T, conn *pgx.Conn) int64 {
	t.Helper()
	return pgtest.Scalar[int64](t, conn, "select coalesce((select done from lanes_progress where lane = 'slow' and version = 1), 0)")
}

// checkVisitedOnce fails unless every row was visited exactly once and the walk and the lane
// are recorded as finished once.
func checkVisitedOnce(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	if n := pgtest.Scalar[int](t, conn, "select count(*) from items where n <> 1"); n != 0 {
		t.Errorf("%d rows not visited exactly once (n = n + 1 per visit): %d twice, %d never", n,
			pgtest.Scalar[int](t, conn, "select count(*) from items where n > 1"), pgtest.Scalar[int](t, conn, "select count(*) from items where n = 0"))
	}
	if n := pgtest.Scalar[int](t, conn, fmt.Sprintf("select count(*) from lanes_progress where lane = 'slow' and done = %d and finished_at is not null", backfillRows)); n != 1 {
		t.Error("the walk's progress does not record every row done")
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where lane = 'slow' and version = 1 and error is null"); n != 1 {
		t.Errorf("%d history rows for the applied backfill, want 1", n)
	}
}

// TestFaultBackfillSigkillResumesExactlyOnce kills the applying replica in the middle of a
// backfill; the other replica takes the lane over and continues from the last committed batch.
func TestFaultBackfillSigkillResumesExactlyOnce(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 2)
	dbURL := pgtest.NewDB(t)
	dir := backfillLanes(t)
	conn := pgtest.Connect(t, dbURL)
	a := startReplica(t, "a", dbURL, dir, backfillEnv...)
	testkit.Eventually(t, "replica a ready", 60*time.Second, a.ready)
	b := startReplica(t, "b", dbURL, dir, backfillEnv...)
	testkit.Eventually(t, "replica b ready", 60*time.Second, b.ready)
	testkit.Eventually(t, "a quarter walked", 3*time.Minute, func() bool { return walked(t, conn) >= backfillRows/4 })
	applier, other := a, b
	if k, _ := b.knows("slow"); k.Role == "applying" {
		applier, other = b, a
	}
	applier.kill(t)
	atKill := walked(t, conn)
	killed := time.Now()
	if atKill >= backfillRows {
		t.Fatalf("the walk finished before the kill (%d rows); make it longer", atKill)
	}
	testkit.Eventually(t, "the other replica finishes the lane", 4*time.Minute, func() bool {
		k, ok := other.knows("slow")
		return ok && k.Done
	})
	figure(t, "backfill_done_after_kill", time.Since(killed), 0)
	checkVisitedOnce(t, conn)
	if !strings.Contains(other.log.String(), "resuming the batched migration after its last committed batch") {
		t.Error("the replica that took over did not resume the walk")
	}
	t.Logf("killed at %d of %d rows committed", atKill, backfillRows)
}

// TestFaultBackfillSurvivesServerRestart restarts PostgreSQL in the middle of a backfill: the
// interrupted batch is retried as transient and the walk continues from its cursor.
func TestFaultBackfillSurvivesServerRestart(t *testing.T) {
	t.Parallel()
	c := startCluster(t, pgcluster.Options{})
	dbURL := c.ConnString("postgres")
	dir := backfillLanes(t)
	r := startReplica(t, "r", dbURL, dir, backfillEnv...)
	testkit.Eventually(t, "replica ready", 60*time.Second, r.ready)
	func() {
		conn := pgtest.Connect(t, dbURL)
		defer conn.Close(t.Context())
		testkit.Eventually(t, "a quarter walked", 3*time.Minute, func() bool { return walked(t, conn) >= backfillRows/4 })
	}()
	if err := c.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the lane done after the restart", 4*time.Minute, func() bool {
		k, ok := r.knows("slow")
		return ok && k.Done
	})
	conn := pgtest.Connect(t, dbURL)
	checkVisitedOnce(t, conn)
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where error is not null and sqlstate not in ('57P01', '57P02', '57P03', '08006')"); n != 0 {
		t.Errorf("the restart was recorded as %d permanent failures", n)
	}
	if log := r.log.String(); !strings.Contains(log, "interrupted by a transient error") || !strings.Contains(log, "resuming the batched migration") {
		t.Error("the replica did not resume the walk interrupted by the restart")
	}
}

// TestFaultBackfillPauseSurvivesRestart pauses a backfill from the command line, stops the
// replica, starts another: the lane stays paused (nothing walks) until `lanes resume`.
func TestFaultBackfillPauseSurvivesRestart(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 2)
	dbURL := pgtest.NewDB(t)
	dir := backfillLanes(t)
	env := []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir}
	conn := pgtest.Connect(t, dbURL)
	r1 := startReplica(t, "r1", dbURL, dir, backfillEnv...)
	testkit.Eventually(t, "replica ready", 60*time.Second, r1.ready)
	testkit.Eventually(t, "a tenth walked", 3*time.Minute, func() bool { return walked(t, conn) >= backfillRows/10 })
	if run := runLanes(t, env, "pause", "--lane", "slow"); run.code != 0 {
		t.Fatalf("lanes pause: %s", run)
	}
	testkit.Eventually(t, "the applier stops at a batch boundary", 30*time.Second, func() bool {
		for _, l := range r1.status(t).Lanes {
			if l.Name == "slow" {
				return l.State == migrator.StatePaused && !l.Locked
			}
		}
		return false
	})
	if k := r1.known(t, "slow"); !k.Paused || !r1.ready() {
		t.Fatalf("replica view while paused: %+v (ready %v)", k, r1.ready())
	}
	paused := walked(t, conn)
	r1.stop(t)
	r2 := startReplica(t, "r2", dbURL, dir, backfillEnv...)
	testkit.Eventually(t, "replica r2 ready", 60*time.Second, r2.ready)
	testkit.Eventually(t, "r2 finds the lane paused", 30*time.Second, func() bool {
		return strings.Contains(r2.log.String(), "background lane paused")
	})
	if k := r2.known(t, "slow"); !k.Paused || k.Done {
		t.Fatalf("r2 view = %+v", k)
	}
	if now := walked(t, conn); now != paused {
		t.Fatalf("the walk moved from %d to %d while paused", paused, now)
	}
	run := runLanes(t, env, "status", "--json")
	var st struct {
		Lanes []migrator.LaneStatus `json:"lanes"`
	}
	if run.code != 0 || json.Unmarshal([]byte(run.stdout), &st) != nil || st.Lanes[1].State != migrator.StatePaused ||
		st.Lanes[1].Progress == nil || st.Lanes[1].Progress.Done != paused || st.Lanes[1].Progress.Total != backfillRows {
		t.Fatalf("lanes status --json while paused: %s", run)
	}
	if run := runLanes(t, env, "resume", "--lane", "slow"); run.code != 0 {
		t.Fatalf("lanes resume: %s", run)
	}
	testkit.Eventually(t, "the lane done after resume", 4*time.Minute, func() bool {
		k, ok := r2.knows("slow")
		return ok && k.Done
	})
	checkVisitedOnce(t, conn)
}

// TestFaultBackfillThrottledByStandbyLag pauses a hot standby's replay: the backfill holds its
// batches back while the lag exceeds LANES_MAX_REPLICATION_LAG, says why in its progress, and
// finishes once replay resumes.
func TestFaultBackfillThrottledByStandbyLag(t *testing.T) {
	t.Parallel()
	primary := startCluster(t, pgcluster.Options{})
	standby, err := primary.StartStandby(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { standby.Stop() })
	dbURL := primary.ConnString("postgres")
	dir := backfillLanes(t)
	sconn := pgtest.Connect(t, standby.ConnString("postgres"))
	if _, err := sconn.Exec(t.Context(), "select pg_wal_replay_pause()"); err != nil {
		t.Fatal(err)
	}
	conn := pgtest.Connect(t, dbURL)
	// A 300 ms pause between batches: on an idle machine the walk would otherwise end within the
	// first second, before any lag the applier measures can exceed the 1 s bound.
	r := startReplica(t, "r", dbURL, dir, append(backfillEnv, "LANES_MAX_REPLICATION_LAG=1s", "LANES_BATCH_PAUSE=300ms")...)
	testkit.Eventually(t, "replica ready", 60*time.Second, r.ready)
	var reason string
	testkit.Eventually(t, "the walk throttled by the standby's lag", 60*time.Second, func() bool {
		k, ok := r.knows("slow")
		if ok && k.Progress != nil && strings.Contains(k.Progress.Throttled, "replication lag") {
			reason = k.Progress.Throttled
			return true
		}
		return false
	})
	held := walked(t, conn)
	if held >= backfillRows {
		t.Fatal("the walk finished although the standby lagged")
	}
	// While replay stays paused, the walk stays where it is: the throttle is re-checked (and
	// its row updated) every second; two updates later nothing more is walked.
	since := pgtest.Scalar[time.Time](t, conn, "select updated_at from lanes_progress where lane = 'slow'")
	testkit.Eventually(t, "two throttle re-checks", 30*time.Second, func() bool {
		return pgtest.Scalar[time.Time](t, conn, "select updated_at from lanes_progress where lane = 'slow'").Sub(since) >= 1500*time.Millisecond
	})
	if now := walked(t, conn); now != held {
		t.Fatalf("the walk moved from %d to %d while the standby lagged", held, now)
	}
	if s := pgtest.Scalar[string](t, conn, "select throttled from lanes_progress where lane = 'slow'"); !strings.Contains(s, "replication lag") {
		t.Fatalf("durable throttle reason = %q", s)
	}
	t.Logf("throttled at %d rows: %s", held, reason)
	if _, err := sconn.Exec(t.Context(), "select pg_wal_replay_resume()"); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the lane done once replay resumed", 4*time.Minute, func() bool {
		k, ok := r.knows("slow")
		return ok && k.Done
	})
	checkVisitedOnce(t, conn)
	if !strings.Contains(r.log.String(), "throttle lifted") {
		t.Error("no log line says the throttle was lifted")
	}
}

// TestFaultBackfillLagUnknownWithoutPgMonitor: a role without pg_monitor cannot read a
// standby's replay position. The walk says the lag is unknown (in its durable progress, which
// status and /lanes show, and once in the log) rather than passing for healthy, and goes on.
func TestFaultBackfillLagUnknownWithoutPgMonitor(t *testing.T) {
	t.Parallel()
	primary := startCluster(t, pgcluster.Options{})
	standby, err := primary.StartStandby(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { standby.Stop() })
	admin := pgtest.Connect(t, primary.ConnString("postgres"))
	for _, q := range []string{"create role walker login", "create database walkdb owner walker"} {
		if _, err := admin.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	testkit.Eventually(t, "the standby streaming", time.Minute, func() bool {
		return pgtest.Scalar[int](t, admin, "select count(*) from pg_stat_replication where state = 'streaming'") > 0
	})
	dbURL := strings.Replace(primary.ConnString("walkdb"), "postgres@", "walker@", 1)
	conn := pgtest.Connect(t, dbURL)
	if pgtest.Scalar[bool](t, conn, "select pg_has_role('pg_monitor', 'member') or (select rolsuper from pg_roles where rolname = current_user)") {
		t.Fatal("walker can read the replication lag: the test needs a role that cannot")
	}
	r := startReplica(t, "r", dbURL, backfillLanes(t), append(backfillEnv, "LANES_MAX_REPLICATION_LAG=1s")...)
	testkit.Eventually(t, "replica ready", 60*time.Second, r.ready)
	testkit.Eventually(t, "the walk says the lag is unknown", time.Minute, func() bool {
		return strings.Contains(pgtest.Scalar[string](t, conn, "select coalesce((select health from lanes_progress where lane = 'slow'), '')"), "replication lag unknown")
	})
	testkit.Eventually(t, "the lane done", 4*time.Minute, func() bool {
		k, ok := r.knows("slow")
		return ok && k.Done
	})
	checkVisitedOnce(t, conn)
	if n := strings.Count(r.log.String(), "cannot read the replication lag"); n != 1 {
		t.Errorf("the unknown lag was logged %d times, want once:\n%s", n, r.log.String())
	}
}
