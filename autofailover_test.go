package main

// A real failover (issue 13): Debian's pg_auto_failover, a monitor and two nodes with
// synchronous replication on loopback (pgcluster.StartAutoFailover), replicas and `lanes
// migrate` connecting with a multi-host URL and target_session_attrs=read-write.

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgconnect"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
)

// startAutoFailover starts a pg_auto_failover formation, stopped at the end of the test. It
// skips the test when pg_auto_failover is not installed, unless LANES_TEST_REQUIRE_DB=1, which
// makes that a failure. Debian builds pg_auto_failover for PostgreSQL 15 only: CI runs these
// tests on 15, and the version matrix (.ci/pg-matrix) leaves them out by name on the others.
func startAutoFailover(t *testing.T) *pgcluster.AutoFailover {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	f, err := pgcluster.StartAutoFailover(ctx, pgcluster.AutoFailoverOptions{})
	if errors.Is(err, pgcluster.ErrNoAutoFailover) && os.Getenv("LANES_TEST_REQUIRE_DB") != "1" {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Stop(); err != nil {
			t.Error(err)
		}
	})
	return f
}

// connectPrimary connects to the formation's primary through the multi-host URL as lanes does
// (pgconnect: a standby that has not replayed the database yet answers 3D000, after which pgx
// alone would not try the next host), and closes the connection at the end of the test.
func connectPrimary(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	cc, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	var conn *pgx.Conn
	testkit.Eventually(t, "a connection to the primary", 2*time.Minute, func() bool {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		conn, err = pgconnect.Connect(ctx, cc)
		return err == nil
	})
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// failoverLanes is runsLanes with the time each migration started in runs.started (the
// server's clock_timestamp: the same machine's clock as the test's).
func failoverLanes(t *testing.T) string {
	return testkit.WriteTree(t, map[string]string{
		"fast/001_runs.sql": `create table runs (version int not null, app text not null default current_setting('application_name'),
  started timestamptz not null default clock_timestamp());
create table hurry (at timestamptz not null default now());`,
		"slow/001_first.sql": "insert into runs (version) values (1);",
		"slow/002_long.sql": `create table long_made (i int);
insert into runs (version) values (2);
select pg_sleep(case when exists (select 1 from hurry) then 0.2 else 60 end);`,
		"slow/003_last.sql": "insert into runs (version) values (3);",
	})
}

// TestFaultAutoFailover runs replicas (`lanes serve`, three unless LANES_FAILOVER_REPLICAS
// says otherwise) and `lanes migrate` on one formation, each subtest in a database of its own:
//   - none: no failover; the slow lane's long migration runs short (the baseline figures);
//   - planned: `pg_autoctl perform failover` while the long migration runs;
//   - crash: the primary's node is killed (pg_autoctl and PostgreSQL, SIGKILL) while it runs;
//   - backfill: a planned failover in the middle of a batched backfill (issue 13 point 7).
//
// Each asserts that every migration took effect exactly once, that every replica learns that
// the lane is done and stays up and ready, and that `lanes migrate` exits 0. The figures:
// from the new primary's first write to the cut migration running again, and from the
// failover (or, without one, from the long migration's start) to every replica knowing the
// lane is done.
func TestFaultAutoFailover(t *testing.T) {
	t.Parallel()
	n := 3
	if v, err := strconv.Atoi(os.Getenv("LANES_FAILOVER_REPLICAS")); err == nil && v > 0 {
		n = v
	}
	serverSlots.reserve(t, n) // the replicas' sessions are on the formation, their CPU is here
	f := startAutoFailover(t)
	t.Run("none", func(t *testing.T) { failoverRun(t, f, "none", n) })
	t.Run("planned", func(t *testing.T) { failoverRun(t, f, "planned", n) })
	t.Run("backfill", func(t *testing.T) { failoverBackfill(t, f, n) })
	t.Run("crash", func(t *testing.T) { failoverRun(t, f, "crash", n) })
}

// failoverBackfill fails the formation over while the replicas walk a batched backfill: the
// walk resumes on the new primary from its last committed batch (every row visited exactly
// once: n = n + 1 per visit), and every replica learns that the lane is done.
func failoverBackfill(t *testing.T, f *pgcluster.AutoFailover, n int) {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute) // a hang guard
	defer cancel()
	if _, err := f.WaitStable(ctx); err != nil {
		t.Fatal(err)
	}
	admin := pgtest.Connect(t, f.URL("postgres"))
	if _, err := admin.Exec(ctx, "create database backfill"); err != nil {
		t.Fatal(err)
	}
	admin.Close(context.Background())
	dbURL := f.URL("backfill")
	dir := backfillLanes(t)
	var rs []*replica
	for i := range n {
		// The walk must outlast the failover on an idle machine too (300 ms between batches), and
		// keep batches of some size on a loaded one (a 200 ms target: at 50 ms a loaded machine
		// shrank them to a few rows, and a quarter of the walk took minutes).
		rs = append(rs, startReplica(t, "backfill"+strconv.Itoa(i+1), dbURL, dir, append(backfillEnv, "LANES_BATCH_PAUSE=300ms", "LANES_BATCH_TARGET=200ms")...))
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" ready", 2*time.Minute, r.ready)
	}
	// The failover begins as soon as the walk has committed a batch: it cuts the walk however
	// fast the machine walks.
	conn := connectPrimary(t, dbURL)
	testkit.Eventually(t, "the walk under way", 3*time.Minute, func() bool { return walked(t, conn) > 0 })
	conn.Close(context.Background())
	if _, err := f.Failover(ctx); err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" knows the backfill is done", 4*time.Minute, func() bool {
			k, ok := r.knows("slow")
			return ok && k.Done
		})
	}
	resumed := false
	for _, r := range rs {
		select {
		case err := <-r.done:
			r.done <- err
			t.Errorf("replica %s exited (%v) across the failover", r.name, err)
		default:
		}
		resumed = resumed || strings.Contains(r.log.String(), "resuming the batched migration after its last committed batch")
	}
	if !resumed {
		t.Error("no replica resumed the walk the failover cut")
	}
	conn = connectPrimary(t, dbURL)
	checkVisitedOnce(t, conn)
}

func failoverRun(t *testing.T, f *pgcluster.AutoFailover, kind string, n int) {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute) // a hang guard
	defer cancel()
	primary, err := f.WaitStable(ctx)
	if err != nil {
		t.Fatal(err)
	}
	admin := pgtest.Connect(t, f.URL("postgres"))
	if _, err := admin.Exec(ctx, "create database "+kind); err != nil {
		t.Fatal(err)
	}
	admin.Close(context.Background())
	dbURL := f.URL(kind)
	dir := failoverLanes(t)
	if kind == "none" {
		// The long migration runs short: the baseline for the figures.
		conn := connectPrimary(t, dbURL)
		for _, sql := range []string{"create table hurry (at timestamptz not null default now())", "insert into hurry default values"} {
			if _, err := conn.Exec(ctx, sql); err != nil {
				t.Fatal(err)
			}
		}
		conn.Close(context.Background())
		dir = testkit.WriteTree(t, map[string]string{
			"fast/001_runs.sql": `create table runs (version int not null, app text not null default current_setting('application_name'),
  started timestamptz not null default clock_timestamp());`,
			"slow/001_first.sql": "insert into runs (version) values (1);",
			"slow/002_long.sql": `create table long_made (i int);
insert into runs (version) values (2);
select pg_sleep(case when exists (select 1 from hurry) then 0.2 else 60 end);`,
			"slow/003_last.sql": "insert into runs (version) values (3);",
		})
	}
	var standbyWait *process
	if kind == "none" {
		// `lanes wait` on the standby alone, with the default settings: LISTEN is refused
		// there, so it polls (every 5 s) the version tables the standby replays.
		other := "node1"
		if primary == "node1" {
			other = "node2"
		}
		standbyURL := f.NodeURL(other, kind)
		// A database the standby has not replayed yet is 3D000 there, which `lanes wait`
		// reports at once (exit 4) with a single-host URL.
		testkit.Eventually(t, "the standby has replayed the database", 2*time.Minute, func() bool {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			c, err := pgx.Connect(cctx, standbyURL)
			if err == nil {
				c.Close(context.Background())
			}
			return err == nil
		})
		standbyWait = startLanes(t, []string{"DATABASE_URL=" + standbyURL, "LANES_MIGRATIONS=" + dir}, "wait", "--lane", "slow", "--timeout", "3m")
	}
	var rs []*replica
	for i := range n {
		rs = append(rs, startReplica(t, kind+strconv.Itoa(i+1), dbURL, dir))
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" ready", 2*time.Minute, r.ready)
	}
	m := startLanes(t, []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir, "PGAPPNAME=lanes-" + kind + "-migrate"}, "migrate", "--timeout", "3m")

	conn := connectPrimary(t, dbURL)
	var began, writable time.Time // the failover (or the long migration's start), the new primary's first write
	if kind == "none" {
		testkit.Eventually(t, "the lane done", 2*time.Minute, func() bool {
			return pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where lane = 'slow' and version = 3") == 1
		})
		began = pgtest.Scalar[time.Time](t, conn, "select started from runs where version = 2")
	} else {
		key := lockKey(t, f.NodeURL(primary, kind), dir, "slow") // the primary alone: pgtest.Connect has no 3D000 fallback
		waitForHolder(t, conn, key, "pg_sleep")
		hurryUp(t, conn) // synchronous replication: the standby has it once this returns
		conn.Close(context.Background())
		other := "node1"
		if primary == "node1" {
			other = "node2"
		}
		firstWrite := watchWritable(ctx, f.NodeURL(other, kind))
		began = time.Now()
		switch kind {
		case "planned":
			if _, err := f.Failover(ctx); err != nil {
				t.Fatal(err)
			}
		case "crash":
			if err := f.Crash(primary); err != nil {
				t.Fatal(err)
			}
		}
		select {
		case writable = <-firstWrite:
		case <-ctx.Done():
			t.Fatalf("node %s never took writes after the %s failover", other, kind)
		}
		testkit.Eventually(t, "a connection to the new primary", 2*time.Minute, func() bool {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			conn, err = pgx.Connect(cctx, dbURL)
			return err == nil
		})
		t.Cleanup(func() { conn.Close(context.Background()) })
	}
	if code, _ := m.wait(t, 4*time.Minute); code != 0 {
		t.Fatalf("lanes migrate exited %d across the %s failover:\n%s", code, kind, m.stderr.String())
	}
	var learned, first time.Time // when the last and the first replica learned the lane was done
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" knows the slow lane is done", 2*time.Minute, func() bool {
			k, ok := r.knows("slow")
			if ok && k.Done && k.DoneAt != nil {
				if k.DoneAt.After(learned) {
					learned = *k.DoneAt
				}
				if first.IsZero() || k.DoneAt.Before(first) {
					first = *k.DoneAt
				}
			}
			return ok && k.Done
		})
	}
	if standbyWait != nil {
		code, at := standbyWait.wait(t, 2*time.Minute)
		if code != 0 {
			t.Fatalf("lanes wait on the standby exited %d:\n%s", code, standbyWait.stderr.String())
		}
		figure(t, "standby_wait_exit_after_done_default_settings", at.Sub(first), 0)
	}
	for _, r := range rs {
		select {
		case err := <-r.done:
			r.done <- err
			t.Errorf("replica %s exited (%v) across the %s failover", r.name, err, kind)
		default:
		}
		if !r.ready() {
			t.Errorf("replica %s is not ready after the %s failover", r.name, kind)
		}
		if strings.Contains(r.log.String(), `"level":"error"`) {
			t.Errorf("replica %s logged an error across the %s failover:\n%s", r.name, kind, r.log.String())
		}
	}
	runs := runsByVersion(t, conn)
	if len(runs[1]) != 1 || len(runs[2]) != 1 || len(runs[3]) != 1 || len(runs) != 3 {
		t.Errorf("runs = %v; want versions 1, 2 and 3 once each", runs)
	}
	checkHistoryExactlyOnce(t, conn, 4)
	figure(t, "failover_"+kind+"_replicas_"+strconv.Itoa(n)+"_every_replica_knows_done", learned.Sub(began), 0)
	if kind != "none" {
		rerun := pgtest.Scalar[time.Time](t, conn, "select started from runs where version = 2")
		figure(t, "failover_"+kind+"_replicas_"+strconv.Itoa(n)+"_writable_to_running_again", rerun.Sub(writable), 0)
		figure(t, "failover_"+kind+"_new_primary_writable", writable.Sub(began), 0)
	}
	if kind == "crash" {
		if err := f.Rejoin(ctx, primary); err != nil { // for the subtests that may follow
			t.Fatal(err)
		}
	}
}

// watchWritable polls the node at url until it takes writes (out of recovery, and no longer
// default_transaction_read_only, which pg_auto_failover keeps on a promoted node until the old
// primary is known demoted) and sends the time it first saw it so, or nothing when ctx ends.
func watchWritable(ctx context.Context, url string) <-chan time.Time {
	ch := make(chan time.Time, 1)
	go func() {
		for ctx.Err() == nil {
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			conn, err := pgx.Connect(cctx, url)
			if err == nil {
				for ctx.Err() == nil {
					var readOnly bool
					if err := conn.QueryRow(cctx, "select pg_is_in_recovery() or current_setting('transaction_read_only') = 'on'").Scan(&readOnly); err != nil {
						break
					}
					if !readOnly {
						ch <- time.Now()
						cancel()
						conn.Close(context.Background())
						return
					}
					cancel()
					time.Sleep(20 * time.Millisecond)
					cctx, cancel = context.WithTimeout(ctx, time.Second)
				}
				conn.Close(context.Background())
			}
			cancel()
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return ch
}
