package main

// Fault-injection tests (issue 3): real `lanes` processes killed, stopped, cut off and fed bad
// input, against real PostgreSQL. Each test fails when the point it is named after is false.
//
// The shared test server (pgtest) serves the tests that do not disturb a server (at most
// serverSlots lanes processes at once); the tests that restart one, need a hot standby or check
// passwords start throwaway clusters (pgcluster). The half-open test puts a faultproxy between a
// replica and the server.
//
// Every figure a test measures is logged as "FIGURE name=1.23s (bound ...)":
//
//	go test -count=1 -v -run 'TestFault' . | grep FIGURE
//
// The replicas are built with -race, which slows them; figures dominated by intervals (takeover,
// reconnect) barely move, and the bounds below leave room for a loaded two-core machine.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/faultproxy"
	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// The intervals behind the documented bounds: the defaults of the code, not knobs of the tests.
const (
	// connCheckInterval is client_connection_check_interval, which internal/session.Prepare
	// sets on every connection to PostgreSQL 14 or later: the server notices a killed client
	// within it. PostgreSQL 13 has no such check: a killed client's session lives on until its
	// running statement ends (see hasDeadClientCheck).
	connCheckInterval = time.Second
	// successorInterval is app.Config.SuccessorInterval's default: the designated successor of
	// a lane (one of the replicas waiting for it) checks this often, on its listener's
	// connection, whether the lane's lock is free.
	successorInterval = time.Second
	// reconnectMax is notifier.Config.ReconnectMax's default: the longest backoff between two
	// reconnect attempts of a LISTEN connection.
	reconnectMax = time.Second
	// connectTimeout is the CLI's connect timeout when the URL sets none.
	connectTimeout = 10 * time.Second
	// slack is what a loaded two-core machine running -race binaries may add to a bound.
	slack = 5 * time.Second
)

// takeoverBound is how long after a replica dies another one holds its lane: the server frees
// the dead session's lock within connCheckInterval, and the lane's successor sees it free at its
// next check, at most successorInterval later (app.Config.TakeoverInterval, 1 minute by default,
// is only a backstop).
const takeoverBound = connCheckInterval + successorInterval + slack

// releasedBound is how long after a replica stopped by SIGTERM another one holds its lane: the
// stopping replica announces that it released the lock, and the others try it at once.
const releasedBound = slack

// runsLanes returns a migrations folder whose fast lane creates the tables runs, in which each
// slow migration records its version and the session that ran it (application_name, that is
// lanes-<replica>), and hurry; its slow lane has three migrations: 001 records itself; 002
// creates the table long_made, records itself, then sleeps a minute, or a fifth of a second once
// hurry has a row (see hurryUp): it is the migration the tests interrupt; 003 records itself.
// A 002 whose transaction was not rolled back would leave a row in runs, and its re-run would
// fail on long_made.
func runsLanes(t *testing.T) string {
	return testkit.WriteTree(t, map[string]string{
		"fast/001_runs.sql": `create table runs (version int not null, app text not null default current_setting('application_name'));
create table hurry (at timestamptz not null default now());`,
		"slow/001_first.sql": "insert into runs (version) values (1);",
		"slow/002_long.sql": `create table long_made (i int);
insert into runs (version) values (2);
select pg_sleep(case when exists (select 1 from hurry) then 0.2 else 60 end);`,
		"slow/003_last.sql": "insert into runs (version) values (3);",
	})
}

// hurryUp makes the next runs of 002_long.sql (see runsLanes) short; the running one, which has
// already read hurry, still sleeps its minute unless it is interrupted.
func hurryUp(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	if _, err := conn.Exec(t.Context(), "insert into hurry default values"); err != nil {
		t.Fatal(err)
	}
}

// runsByVersion returns, per version in runs, the sessions that recorded it.
func runsByVersion(t *testing.T, conn *pgx.Conn) map[int][]string {
	t.Helper()
	rows, err := conn.Query(t.Context(), "select version, app from runs order by version, app")
	if err != nil {
		t.Fatal(err)
	}
	out := map[int][]string{}
	for rows.Next() {
		var v int
		var app string
		if err := rows.Scan(&v, &app); err != nil {
			t.Fatal(err)
		}
		out[v] = append(out[v], app)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// checkHistoryExactlyOnce fails the test unless every (lane, version) of lanes_history has
// exactly one successful row, there are want rows in all, and no failed attempt was recorded.
func checkHistoryExactlyOnce(t *testing.T, conn *pgx.Conn, want int) {
	t.Helper()
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where error is not null"); n != 0 {
		t.Errorf("history records %d failed attempts, want none", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from (select lane, version from lanes_history where error is null group by 1, 2 having count(*) <> 1) d"); n != 0 {
		t.Errorf("history has %d lane versions applied more than once", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history"); n != want {
		t.Errorf("history has %d rows, want %d (each migration exactly once)", n, want)
	}
}

// waitForHolder waits until a session holds the lock key and runs a statement containing
// query (lower case), and returns it.
func waitForHolder(t *testing.T, conn *pgx.Conn, key int64, query string) holder {
	t.Helper()
	var h holder
	testkit.Eventually(t, "a session holding the lane's lock running "+query, 90*time.Second, func() bool {
		var ok bool
		h, ok = lockHolder(t, conn, key)
		return ok && h.state == "active" && strings.Contains(strings.ToLower(h.query), query)
	})
	return h
}

// TestFaultConcurrentStartupAppliesExactlyOnce starts eight `lanes serve` processes at the same
// instant on an empty database: every migration of both lanes is applied exactly once (one
// history row each, one side effect each, no failed attempt), every replica becomes ready and
// every replica learns that each lane is done.
func TestFaultConcurrentStartupAppliesExactlyOnce(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 8)
	dbURL := pgtest.NewDB(t)
	// Each migration records itself in applied; a second run of any of them would also fail
	// (primary key, existing table) and leave a failed attempt in the history.
	dir := testkit.WriteTree(t, map[string]string{
		"fast/001_applied.sql": "create table applied (lane text not null, version int not null, app text not null default current_setting('application_name'));\ninsert into applied (lane, version) values ('fast', 1);",
		"fast/002_example.sql": "create table example (id int primary key, name text not null);\ninsert into applied (lane, version) values ('fast', 2);",
		"fast/003_seed.sql":    "insert into example select g, 'seed-' || g from generate_series(1, 100) g;\ninsert into applied (lane, version) values ('fast', 3);",
		"slow/001_sleep.sql":   "select pg_sleep(2);\ninsert into applied (lane, version) values ('slow', 1);",
		"slow/002_index.sql":   "---- tern: disable-tx ----\ndrop index concurrently if exists example_name_idx;\ncreate index concurrently example_name_idx on example (name);\ninsert into applied (lane, version) values ('slow', 2);",
		"slow/003_more.sql":    "insert into example select g, 'more-' || g from generate_series(101, 200) g;\ninsert into applied (lane, version) values ('slow', 3);",
	})
	lanesBinary(t) // build first, so that the processes start together
	// Eight replicas use about 30 connections of the local server's 100 (a LISTEN connection, a
	// lane connection and up to two for /lanes each): see serverSlots.
	const replicas = 8
	var rs []*replica
	for i := range replicas {
		rs = append(rs, startReplica(t, fmt.Sprintf("c%d", i+1), dbURL, dir))
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" ready", 90*time.Second, r.ready)
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" learns both lanes are done", 90*time.Second, func() bool {
			v, ok := r.view()
			return ok && len(v.Lanes) == 2 && v.Lanes[0].Done && v.Lanes[1].Done
		})
	}
	conn := pgtest.Connect(t, dbURL)
	checkHistoryExactlyOnce(t, conn, 6)
	if n := pgtest.Scalar[int](t, conn, "select count(*) from (select lane, version from applied group by 1, 2 having count(*) = 1) d"); n != 6 {
		t.Errorf("applied holds %d lane versions recorded exactly once, want 6", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from applied"); n != 6 {
		t.Errorf("applied has %d rows, want 6", n)
	}
	if f, s := pgtest.Scalar[int](t, conn, "select version from lanes_fast_version"), pgtest.Scalar[int](t, conn, "select version from lanes_slow_version"); f != 3 || s != 3 {
		t.Errorf("versions fast=%d slow=%d, want 3 and 3", f, s)
	}
	via := map[string]int{}
	for _, r := range rs {
		k, _ := r.knows("slow")
		via[k.Via]++
	}
	appliers := pgtest.Scalar[int](t, conn, "select count(distinct app) from applied where lane = 'slow'")
	t.Logf("%d replicas: slow lane applied by %d replica(s); how the replicas learned it was done: %v", replicas, appliers, via)
}

// TestFaultTakeoverAfterSigkill kills (SIGKILL) the replica applying the slow lane in the middle
// of its second migration: another replica takes the lane over within takeoverBound, resumes
// from the durable version (the first migration is not run again), finishes, and every surviving
// replica learns it; the killed transaction left nothing (its row in runs is gone and the re-run
// could create long_made again).
func TestFaultTakeoverAfterSigkill(t *testing.T) {
	t.Parallel()
	takeoverAfterSigkill(t, nil)
}

// takeoverAfterSigkill is TestFaultTakeoverAfterSigkill, with the replicas connecting through
// through(t, dbURL) (a pooler) when through is not nil.
func takeoverAfterSigkill(t *testing.T, through func(t *testing.T, dbURL string) string) {
	takeoverAfterSigkillEnv(t, through, false)
}

// takeoverAfterSigkillEnv is takeoverAfterSigkill; with direct, the replicas also get
// LANES_DIRECT_URL, the database's own URL (through is then a pooler).
func takeoverAfterSigkillEnv(t *testing.T, through func(t *testing.T, dbURL string) string, direct bool) {
	serverSlots.reserve(t, 3)
	dbURL := pgtest.NewDB(t)
	replicaURL := dbURL
	if through != nil {
		replicaURL = through(t, dbURL)
	}
	dir := runsLanes(t)
	key := lockKey(t, dbURL, dir, "slow")
	conn := pgtest.Connect(t, dbURL)
	rs := map[string]*replica{}
	var env []string
	if direct {
		env = append(env, "LANES_DIRECT_URL="+dbURL)
	}
	for _, name := range []string{"k1", "k2", "k3"} {
		rs["lanes-"+name] = startReplica(t, name, replicaURL, dir, env...)
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" ready", 60*time.Second, r.ready)
	}
	h := waitForHolder(t, conn, key, "pg_sleep")
	victim := rs[h.app]
	if victim == nil {
		t.Fatalf("the slow lane's lock is held by %q, not by a replica", h.app)
	}
	if v := pgtest.Scalar[int](t, conn, "select version from lanes_slow_version"); v != 1 {
		t.Fatalf("durable version %d when the long migration runs, want 1", v)
	}
	// Without a dead-client check (PostgreSQL 13) the killed session lives on until its
	// pg_sleep(60) ends: the lock is freed then, and taken over at the survivors' next check.
	deadCheck := hasDeadClientCheck(t, conn)
	stmtLeft := time.Duration(pgtest.Scalar[float64](t, conn, "select extract(epoch from query_start + interval '60 s' - clock_timestamp())::float8 from pg_stat_activity where pid = $1", h.pid) * float64(time.Second))
	victim.kill(t)
	killed := time.Now()
	hurryUp(t, conn)

	freeBound := connCheckInterval + slack
	if !deadCheck {
		freeBound = stmtLeft + slack
	}
	var freed, took time.Duration
	var taker holder
	testkit.Eventually(t, "another replica takes the slow lane over", freeBound+takeoverBound+slack, func() bool {
		cur, ok := lockHolder(t, conn, key)
		if freed == 0 && (!ok || cur.pid != h.pid) {
			freed = time.Since(killed)
		}
		var found bool
		taker, took, found = takenOver(t, conn, key, h, killed)
		return found
	})
	figure(t, "lock_free_after_sigkill", freed, freeBound)
	if deadCheck {
		figure(t, "takeover_after_sigkill", took, takeoverBound)
		if took > takeoverBound {
			t.Errorf("takeover after %s, want within %s", took, takeoverBound)
		}
	} else {
		t.Logf("no dead-client check on this server: the killed statement had %s left to run", stmtLeft.Round(time.Millisecond))
		figure(t, "takeover_after_sigkill_minus_statement_left", took-stmtLeft, takeoverBound)
		if took-freed > successorInterval+slack {
			t.Errorf("takeover %s after the lock was freed, want within %s", took-freed, successorInterval+slack)
		}
	}
	if freed > freeBound {
		t.Errorf("the killed replica's lock was freed after %s, want within %s", freed, freeBound)
	}
	if rs[taker.app] == nil || taker.app == h.app {
		t.Fatalf("the lock went to %q", taker.app)
	}

	var survivors []*replica
	for app, r := range rs {
		if app != h.app {
			survivors = append(survivors, r)
		}
	}
	for _, r := range survivors {
		testkit.Eventually(t, "replica "+r.name+" learns the slow lane is done", 60*time.Second, func() bool {
			k, ok := r.knows("slow")
			return ok && k.Done
		})
	}
	runs := runsByVersion(t, conn)
	if !slices.Equal(runs[1], []string{h.app}) || !slices.Equal(runs[2], []string{taker.app}) || !slices.Equal(runs[3], []string{taker.app}) || len(runs) != 3 {
		t.Errorf("runs = %v; want version 1 once by %s (durable before the kill, not re-run), 2 and 3 once by %s", runs, h.app, taker.app)
	}
	if pgtest.Scalar[*string](t, conn, "select to_regclass('long_made')::text") == nil {
		t.Error("long_made does not exist")
	}
	checkHistoryExactlyOnce(t, conn, 4)
	if app := pgtest.Scalar[string](t, conn, "select application_name from lanes_history where lane = 'slow' and version = 2"); app != taker.app {
		t.Errorf("slow version 2 recorded as applied by %s, want %s", app, taker.app)
	}
	var via []string
	for _, r := range survivors {
		k, _ := r.knows("slow")
		via = append(via, r.name+":"+k.Via)
		// The replica that took over knows from its own commit, or from its own notification
		// when the listener was quicker.
		if r.appName() == taker.app && k.Via != "applied" && k.Via != "notification" {
			t.Errorf("the replica that took over learned the lane was done by %q, want applied or notification", k.Via)
		}
	}
	t.Logf("killed %s; %s took over; survivors learned it by %v", h.app, taker.app, via)
}

// TestFaultInterruptedConcurrentIndexIsRebuilt kills (SIGKILL) the replica running a disable-tx
// migration in the middle of a slow CREATE INDEX CONCURRENTLY: the killed build leaves an
// INVALID big_idx behind, and the replica that takes over runs the file again, which drops that
// index (DROP INDEX CONCURRENTLY IF EXISTS: what authors of re-runnable disable-tx files write)
// and builds it anew. At the end there is exactly one big_idx, valid, and not the killed one.
func TestFaultInterruptedConcurrentIndexIsRebuilt(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 2)
	dbURL := pgtest.NewDB(t)
	dir := testkit.WriteTree(t, map[string]string{
		// slow_key sleeps 2 ms a row: building an index on it over 6,000 rows takes about 12 s,
		// so that the kill lands inside the build however long a loaded machine delays the test.
		"fast/001_big.sql": `create table big (i int not null);
insert into big select generate_series(1, 6000);
create function slow_key(i int) returns int language plpgsql immutable as $$
begin
  perform pg_sleep(0.002);
  return i;
end $$;`,
		"slow/001_big_idx.sql": `---- tern: disable-tx ----
-- Re-runnable: a build killed halfway leaves an INVALID big_idx behind; drop it first.
drop index concurrently if exists big_idx;
create index concurrently big_idx on big (slow_key(i));`,
	})
	key := lockKey(t, dbURL, dir, "slow")
	conn := pgtest.Connect(t, dbURL)
	rs := map[string]*replica{}
	for _, name := range []string{"i1", "i2"} {
		rs["lanes-"+name] = startReplica(t, name, dbURL, dir)
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" ready", 60*time.Second, r.ready)
	}
	h := waitForHolder(t, conn, key, "create index concurrently")
	victim, survivor := rs[h.app], rs["lanes-i1"]
	if survivor == victim {
		survivor = rs["lanes-i2"]
	}
	if victim == nil {
		t.Fatalf("the slow lane's lock is held by %q, not by a replica", h.app)
	}
	// The concurrent build enters big_idx in the catalog, invalid, before it scans the table.
	var killedIdx uint32
	testkit.Eventually(t, "big_idx in the catalog", 20*time.Second, func() bool {
		return conn.QueryRow(t.Context(), "select oid from pg_class where relname = 'big_idx'").Scan(&killedIdx) == nil
	})
	if pgtest.Scalar[bool](t, conn, "select indisvalid from pg_index where indexrelid = $1", killedIdx) {
		t.Fatal("big_idx is valid already: the build is too fast for this test")
	}
	time.Sleep(500 * time.Millisecond) // well inside the ~12 s build
	deadCheck := hasDeadClientCheck(t, conn)
	victim.kill(t)
	killed := time.Now()

	// When the killed session is gone, its index is still there and INVALID, unless the
	// survivor has already dropped it. Without a dead-client check (PostgreSQL 13) the killed
	// session finishes its build first: its index is then VALID, and the survivor's re-run
	// still replaces it.
	endBound := connCheckInterval + slack
	if !deadCheck {
		endBound = time.Minute
	}
	testkit.Eventually(t, "the killed replica's sessions end", endBound, func() bool {
		return pgtest.Scalar[int](t, conn, "select count(*) from pg_stat_activity where datname = current_database() and application_name = $1", h.app) == 0
	})
	ended := time.Since(killed)
	var leftValid *bool
	if err := conn.QueryRow(t.Context(), "select indisvalid from pg_index where indexrelid = $1", killedIdx).Scan(&leftValid); err == nil && leftValid != nil {
		if *leftValid && deadCheck {
			t.Fatal("the killed build left a VALID index")
		}
		t.Logf("the killed build left big_idx (oid %d) valid=%v", killedIdx, *leftValid)
	}

	var took time.Duration
	testkit.Eventually(t, "the survivor takes the slow lane over", 60*time.Second, func() bool {
		cur, ok := lockHolder(t, conn, key)
		took = time.Since(killed)
		if !ok && pgtest.Scalar[int](t, conn, "select version from lanes_slow_version") != 0 {
			// The survivor's build takes seconds under the lock: this version is the killed one's.
			t.Fatal("the lane is recorded as done although its index build was killed")
		}
		return ok && cur.app == survivor.appName()
	})
	figure(t, "takeover_after_sigkill_during_concurrent_index", took, takeoverBound)
	if deadCheck && took > takeoverBound {
		t.Errorf("takeover after %s, want within %s", took, takeoverBound)
	}
	if !deadCheck && took-ended > successorInterval+slack {
		t.Errorf("takeover %s after the killed session ended, want within %s", took-ended, successorInterval+slack)
	}
	testkit.Eventually(t, "the survivor learns the slow lane is done", 60*time.Second, func() bool {
		k, ok := survivor.knows("slow")
		return ok && k.Done
	})
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_class where relname = 'big_idx'"); n != 1 {
		t.Errorf("%d indexes named big_idx, want 1", n)
	}
	var oid uint32
	var valid, ready bool
	if err := conn.QueryRow(t.Context(), "select indexrelid, indisvalid, indisready from pg_index where indexrelid = 'big_idx'::regclass").Scan(&oid, &valid, &ready); err != nil {
		t.Fatal(err)
	}
	if !valid || !ready || oid == killedIdx {
		t.Errorf("big_idx: oid %d (killed build's %d) valid=%v ready=%v; want a new, valid index", oid, killedIdx, valid, ready)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_class where oid = $1", killedIdx); n != 0 {
		t.Error("the killed build's index is still there")
	}
	checkHistoryExactlyOnce(t, conn, 2)
	if app := pgtest.Scalar[string](t, conn, "select application_name from lanes_history where lane = 'slow'"); app != survivor.appName() {
		t.Errorf("the index recorded as built by %s, want %s", app, survivor.appName())
	}
}

// gatedLanes returns a migrations folder whose one slow migration waits for advisory lock 4242,
// and a connection holding that lock: the test decides when the slow lane commits, by
// releasing it (pg_advisory_unlock(4242) on the connection).
func gatedLanes(t *testing.T, dbURL string) (string, *pgx.Conn) {
	t.Helper()
	dir := testkit.WriteTree(t, map[string]string{
		"fast/001_t.sql":     "create table t (i int);",
		"slow/001_gated.sql": "select pg_advisory_xact_lock(4242);\ninsert into t values (1);",
	})
	gate := pgtest.Connect(t, dbURL)
	if _, err := gate.Exec(t.Context(), "select pg_advisory_lock(4242)"); err != nil {
		t.Fatal(err)
	}
	return dir, gate
}

// gatedApplier starts the replica that applies the slow lane of gatedLanes, and returns once it
// waits at the gate holding the lane's lock.
func gatedApplier(t *testing.T, name, dbURL, dir string, gate *pgx.Conn) *replica {
	t.Helper()
	r := startReplica(t, name, dbURL, dir)
	testkit.Eventually(t, "replica "+name+" ready", 60*time.Second, r.ready)
	if h := waitForHolder(t, gate, lockKey(t, dbURL, dir, "slow"), "pg_advisory_xact_lock"); h.app != r.appName() {
		t.Fatalf("the slow lane is held by %s, want %s", h.app, r.appName())
	}
	return r
}

// openGate lets the slow lane of gatedLanes commit, and returns once it has.
func openGate(t *testing.T, gate *pgx.Conn) {
	t.Helper()
	if _, err := gate.Exec(t.Context(), "select pg_advisory_unlock(4242)"); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the slow lane committed", 30*time.Second, func() bool {
		return pgtest.Scalar[int](t, gate, "select version from lanes_slow_version") == 1
	})
}

// TestFaultNoLostSignalAfterTerminate cuts a non-applying replica and a `lanes wait` off the
// server (pg_terminate_backend of all their sessions, and the database closed to new
// connections) just before the slow lane commits, so that both miss its notification: once
// they can connect again, both learn the lane is done by re-reading the version tables, within
// reconnectMax (the longest reconnect backoff) plus slack. Their logs say so once, not once per
// attempt.
func TestFaultNoLostSignalAfterTerminate(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 3)
	dbURL := pgtest.NewDB(t)
	dir, gate := gatedLanes(t, dbURL)
	gatedApplier(t, "a1", dbURL, dir, gate)
	cut := startReplica(t, "n1", dbURL, dir)
	testkit.Eventually(t, "replica n1 waiting for the slow lane", 60*time.Second, func() bool {
		k, ok := cut.knows("slow")
		return ok && k.Role == "waiting"
	})
	w := startLanes(t, []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir, "PGAPPNAME=lanes-w1"}, "wait", "--lane", "slow", "--timeout", "120s")
	testkit.Eventually(t, "lanes wait listening", 60*time.Second, func() bool {
		return strings.Contains(w.stderr.String(), "waiting for the lane through LISTEN/NOTIFY")
	})

	admin := pgtest.Connect(t, pgtest.AdminURL(t))
	db := pgx.Identifier{pgtest.Scalar[string](t, gate, "select current_database()")}.Sanitize()
	if _, err := admin.Exec(t.Context(), "alter database "+db+" allow_connections false"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = admin.Exec(context.Background(), "alter database "+db+" allow_connections true") })
	const theirs = "datname = current_database() and application_name in ('lanes-n1', 'lanes-w1')"
	terminate := "pg_terminate_backend(pid, 10000)" // waits for the session to end
	if !hasDeadClientCheck(t, gate) {
		terminate = "pg_terminate_backend(pid)" // PostgreSQL 13 has no timeout argument
	}
	if n := pgtest.Scalar[int](t, gate, "select count(*) from pg_stat_activity where "+theirs+" and "+terminate); n < 2 {
		t.Fatalf("terminated %d sessions of n1 and w1, want at least their two LISTEN connections", n)
	}
	testkit.Eventually(t, "n1 and w1 have no session", 30*time.Second, func() bool {
		// Terminate again any session that got in before the database was closed.
		return pgtest.Scalar[int](t, gate, "select count(*) from pg_stat_activity where "+theirs+" and not "+terminate) == 0 &&
			pgtest.Scalar[int](t, gate, "select count(*) from pg_stat_activity where "+theirs) == 0
	})
	// The slow lane commits and notifies while neither n1 nor w1 listens.
	openGate(t, gate)
	if k, ok := cut.knows("slow"); !ok || k.Done {
		t.Fatalf("n1 knows the lane is done (%+v, answered %v) before it could read it: the test did not cut it off", k, ok)
	}
	if w.exited() {
		t.Fatalf("lanes wait exited before it could read the lane:\n%s", w.stderr.String())
	}

	reopened := time.Now()
	if _, err := admin.Exec(t.Context(), "alter database "+db+" allow_connections true"); err != nil {
		t.Fatal(err)
	}
	bound := reconnectMax + slack
	code, at := w.wait(t, 60*time.Second)
	if code != 0 {
		t.Fatalf("lanes wait exited %d:\n%s", code, w.stderr.String())
	}
	var learned time.Duration
	var k app.KnownLane
	testkit.Eventually(t, "n1 learns the slow lane is done", 60*time.Second, func() bool {
		var ok bool
		k, ok = cut.knows("slow")
		learned = time.Since(reopened)
		return ok && k.Done
	})
	figure(t, "learn_after_terminate_wait", at.Sub(reopened), bound)
	figure(t, "learn_after_terminate_serve", learned, bound)
	if d := at.Sub(reopened); d > bound {
		t.Errorf("lanes wait learned the lane was done %s after the server took connections again, want within %s", d, bound)
	}
	if learned > bound {
		t.Errorf("n1 learned the lane was done %s after the server took connections again, want within %s", learned, bound)
	}
	// n1 missed the notification: it learned from a read, by its listener on reconnect
	// ("connect") or by its lane goroutine's next look ("check").
	if k.Via != "connect" && k.Via != "check" {
		t.Errorf("n1 learned the lane was done by %q, want connect or check", k.Via)
	}
	t.Logf("n1 learned the lane was done by %s", k.Via)
	for name, log := range map[string]string{"lanes wait": w.stderr.String(), "n1": cut.log.String()} {
		if n := strings.Count(log, "cannot reconnect the notification connection"); n > 1 {
			t.Errorf("%s logged its failed reconnects %d times, want at most once", name, n)
		}
	}
}

// TestFaultNoLostSignalThroughHalfOpenConnection puts a TCP proxy between a non-applying
// replica and the server and makes it stop forwarding anything (a network partition: the
// connections stay open, nothing arrives) just before the slow lane commits. The replica's
// listener finds its connection dead by a ping that gets no answer (LANES_PING_INTERVAL=1s, and
// the 5 s ping timeout), within ping interval + ping timeout; once the network heals it
// reconnects and learns the lane is done by re-reading it, within reconnectMax.
func TestFaultNoLostSignalThroughHalfOpenConnection(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 2)
	dbURL := pgtest.NewDB(t)
	dir, gate := gatedLanes(t, dbURL)
	proxy, err := faultproxy.New(pgtest.ProxyTarget(t, dbURL))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	proxied := pgtest.ThroughProxy(t, dbURL, proxy.Addr())
	gatedApplier(t, "a2", dbURL, dir, gate)
	const pingInterval, pingTimeout = time.Second, 5 * time.Second
	cut := startReplica(t, "h1", proxied, dir, "LANES_PING_INTERVAL="+pingInterval.String())
	testkit.Eventually(t, "replica h1 waiting for the slow lane", 60*time.Second, func() bool {
		k, ok := cut.knows("slow")
		return ok && k.Role == "waiting"
	})

	proxy.SetBlackhole(true)
	partitioned := time.Now()
	openGate(t, gate) // the notification to h1 is held in the partition
	testkit.Eventually(t, "h1 finds its LISTEN connection dead", 60*time.Second, func() bool {
		return strings.Contains(cut.log.String(), "notification connection lost")
	})
	detected := time.Since(partitioned)
	// Heal the network; the connections that were open across the partition are gone (as
	// after a real one, where the server or the kernel ends them), so the held notification is
	// never delivered.
	proxy.CutAll()
	proxy.SetBlackhole(false)
	healed := time.Now()
	var k app.KnownLane
	testkit.Eventually(t, "h1 learns the slow lane is done", 60*time.Second, func() bool {
		var ok bool
		k, ok = cut.knows("slow")
		return ok && k.Done
	})
	learned := time.Since(healed)
	detectBound := pingInterval + pingTimeout + slack
	figure(t, "half_open_detected_ping_1s", detected, detectBound)
	figure(t, "learn_after_half_open_heals", learned, reconnectMax+slack)
	if detected > detectBound {
		t.Errorf("the half-open connection was found dead after %s, want within %s", detected, detectBound)
	}
	if learned > reconnectMax+slack {
		t.Errorf("h1 learned the lane was done %s after the network healed, want within %s", learned, reconnectMax+slack)
	}
	if !strings.Contains(cut.log.String(), `"error":"ping: `) {
		t.Errorf("h1 did not find the dead connection by its ping:\n%s", cut.log.String())
	}
	if k.Via != "connect" && k.Via != "check" {
		t.Errorf("h1 learned the lane was done by %q, want connect or check (its notification was lost)", k.Via)
	}
	t.Logf("h1 learned the lane was done by %s", k.Via)
}

// TestFaultNoLostSignalAcrossServerRestart restarts a throwaway server while the slow lane's
// second migration runs: the replicas reconnect, the interrupted migration is retried as a
// transient failure (not recorded as a permanent one), the lane completes with every migration
// applied once, and every replica and a `lanes wait` learn it.
func TestFaultNoLostSignalAcrossServerRestart(t *testing.T) {
	t.Parallel()
	c := startCluster(t, pgcluster.Options{})
	dbURL := c.ConnString("postgres")
	dir := runsLanes(t)
	key := lockKey(t, dbURL, dir, "slow")
	rs := []*replica{startReplica(t, "s1", dbURL, dir), startReplica(t, "s2", dbURL, dir)}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" ready", 60*time.Second, r.ready)
	}
	w := startLanes(t, []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir, "PGAPPNAME=lanes-sw"}, "wait", "--lane", "slow", "--timeout", "120s")
	testkit.Eventually(t, "lanes wait listening", 60*time.Second, func() bool {
		return strings.Contains(w.stderr.String(), "waiting for the lane through LISTEN/NOTIFY")
	})
	func() {
		conn, err := pgx.Connect(t.Context(), dbURL)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		waitForHolder(t, conn, key, "pg_sleep")
		hurryUp(t, conn)
	}()

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if err := c.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	up := time.Now()
	testkit.Eventually(t, "every replica listening again", 60*time.Second, func() bool {
		for _, r := range rs {
			// Idle counts too: a replica closes its listener once it knows every lane done,
			// which it can learn only through a read after the restart (the slow lane was
			// running when the server stopped).
			if v, ok := r.view(); !ok || v.Listener != "listening" && v.Listener != "idle" {
				return false
			}
		}
		return true
	})
	relisten := time.Since(up)
	figure(t, "relisten_after_restart", relisten, reconnectMax+slack)
	if relisten > reconnectMax+slack {
		t.Errorf("replicas listening again %s after the restart, want within %s", relisten, reconnectMax+slack)
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" learns the slow lane is done", 90*time.Second, func() bool {
			k, ok := r.knows("slow")
			return ok && k.Done
		})
	}
	code, waited := w.wait(t, 60*time.Second)
	if code != 0 {
		t.Fatalf("lanes wait exited %d:\n%s", code, w.stderr.String())
	}
	conn := pgtest.Connect(t, dbURL)
	finished := pgtest.Scalar[time.Time](t, conn, "select finished_at from lanes_history where lane = 'slow' and version = 3 and error is null")
	latest := waited.Sub(finished)
	learned := []string{fmt.Sprintf("wait:%s", latest.Round(time.Millisecond))}
	for _, r := range rs {
		k, _ := r.knows("slow")
		if k.DoneAt != nil {
			latest = max(latest, k.DoneAt.Sub(finished))
			learned = append(learned, fmt.Sprintf("%s:%s:%s", r.name, k.Via, k.DoneAt.Sub(finished).Round(time.Millisecond)))
		}
	}
	t.Logf("after the last slow migration committed, learned by: %v", learned)
	figure(t, "learn_after_restart", latest, slack)
	figure(t, "lane_done_after_restart", time.Since(up), 0)
	if latest > slack {
		t.Errorf("the last replica learned the lane was done %s after it committed, want within %s", latest, slack)
	}

	runs := runsByVersion(t, conn)
	if len(runs) != 3 || len(runs[1]) != 1 || len(runs[2]) != 1 || len(runs[3]) != 1 {
		t.Errorf("runs = %v, want each version once", runs)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from (select lane, version from lanes_history where error is null group by 1, 2 having count(*) <> 1) d"); n != 0 {
		t.Errorf("history has %d lane versions applied more than once", n)
	}
	rows, err := conn.Query(t.Context(), "select coalesce(sqlstate, ''), error from lanes_history where error is not null")
	if err != nil {
		t.Fatal(err)
	}
	failures, err := pgx.CollectRows(rows, pgx.RowToStructByPos[struct{ SQLState, Error string }])
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range failures {
		if !migrator.IsTransient(&pgconn.PgError{Code: f.SQLState}) {
			t.Errorf("the restart was recorded as a permanent failure: %s %s", f.SQLState, f.Error)
		}
	}
	retried := false
	for _, r := range rs {
		log := r.log.String()
		retried = retried || strings.Contains(log, "interrupted by a transient error")
		if strings.Contains(log, "background migration failed") {
			t.Errorf("replica %s took the restart for a permanent failure", r.name)
		}
	}
	if !retried {
		t.Error("no replica logged retrying the interrupted migration")
	}
}

// TestFaultWaitOnHotStandbyFallsBackToPolling points `lanes wait` at a hot standby, where LISTEN
// fails (SQLSTATE 25006): it says so once, polls, tries LISTEN again every relisten interval
// without saying it again, and exits 0 once the primary's slow lane is done and replayed.
func TestFaultWaitOnHotStandbyFallsBackToPolling(t *testing.T) {
	t.Parallel()
	primary := startCluster(t, pgcluster.Options{})
	standby := pgtest.StartStandby(t, primary, 2*time.Minute)
	dir := testkit.WriteTree(t, map[string]string{
		"fast/001_t.sql":     "create table t (i int);",
		"slow/001_sleep.sql": "select pg_sleep(1);",
		"slow/002_after.sql": "create table after_sleep (i int);",
	})
	const poll, relisten = 300 * time.Millisecond, time.Second
	w := startLanes(t, []string{"DATABASE_URL=" + standby.ConnString("postgres"), "LANES_MIGRATIONS=" + dir, "PGAPPNAME=lanes-standby-wait",
		"LANES_POLL_INTERVAL=" + poll.String(), "LANES_RELISTEN_INTERVAL=" + relisten.String()},
		"wait", "--lane", "slow", "--timeout", "120s")
	testkit.Eventually(t, "lanes wait says it polls", 30*time.Second, func() bool { return strings.Contains(w.stderr.String(), "polling instead") })

	// Each attempt to LISTEN again is a new session on the standby: collect their pids while
	// several relisten intervals pass.
	sconn := pgtest.Connect(t, standby.ConnString("postgres"))
	sessions := map[int]bool{}
	for end := time.Now().Add(3*relisten + relisten/2); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		rows, err := sconn.Query(t.Context(), "select pid from pg_stat_activity where datname = current_database() and application_name = 'lanes-standby-wait'")
		if err != nil {
			t.Fatal(err)
		}
		pids, err := pgx.CollectRows(rows, pgx.RowTo[int])
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pids {
			sessions[p] = true
		}
	}
	if w.exited() {
		t.Fatalf("lanes wait exited before anything was migrated:\n%s", w.stderr.String())
	}
	if res := runLanes(t, []string{"DATABASE_URL=" + primary.ConnString("postgres"), "LANES_MIGRATIONS=" + dir}, "migrate"); res.code != 0 {
		t.Fatalf("migrate on the primary: %v", res)
	}
	migrated := time.Now()
	code, at := w.wait(t, 60*time.Second)
	log := w.stderr.String()
	if code != 0 {
		t.Fatalf("lanes wait on the standby exited %d:\n%s", code, log)
	}
	bound := poll + slack
	figure(t, "standby_wait_exit_after_primary_done", max(0, at.Sub(migrated)), bound)
	if d := at.Sub(migrated); d > bound {
		t.Errorf("lanes wait exited %s after the primary's lane was done, want within %s (poll interval + replay)", d, bound)
	}
	if n := strings.Count(log, "polling instead"); n != 1 {
		t.Errorf("the fallback to polling was logged %d times, want once:\n%s", n, log)
	}
	if !strings.Contains(log, "SQLSTATE 25006") {
		t.Errorf("the fallback does not say why LISTEN failed:\n%s", log)
	}
	for _, storm := range []string{"cannot reconnect", "connection lost"} {
		if strings.Contains(log, storm) {
			t.Errorf("lanes wait logged %q while polling:\n%s", storm, log)
		}
	}
	if len(sessions) < 2 {
		t.Errorf("lanes wait used %d session(s) on the standby in %s; want a new one per attempt to LISTEN again", len(sessions), 3*relisten)
	}
	if !strings.Contains(log, `"version":2`) || !strings.Contains(log, "lane reached the version") {
		t.Errorf("lanes wait did not report version 2:\n%s", log)
	}
	// status on the standby says it is read-only, in recovery (issue 13 point 5).
	env := []string{"DATABASE_URL=" + standby.ConnString("postgres"), "LANES_MIGRATIONS=" + dir}
	if res := runLanes(t, env, "status"); res.code != 0 || !strings.Contains(res.stdout, "server: read-only (in recovery: a hot standby)") {
		t.Errorf("status on the standby does not say it is read-only, in recovery: %v", res)
	}
	if res := runLanes(t, env, "status", "--json"); res.code != 0 || !strings.Contains(res.stdout, `"read_only": true`) || !strings.Contains(res.stdout, `"in_recovery": true`) {
		t.Errorf("status --json on the standby does not say it is read-only, in recovery: %v", res)
	}
	if res := runLanes(t, []string{"DATABASE_URL=" + primary.ConnString("postgres"), "LANES_MIGRATIONS=" + dir}, "status"); res.code != 0 || strings.Contains(res.stdout, "server:") {
		t.Errorf("status on the primary: %v; want no word about the server", res)
	}
}

// TestFaultRollbackDeploy applies a newer migrations folder (fast lane at 2, slow lane at 3),
// then starts a replica with the older folder (fast 1, slow 2): it becomes ready, reports both
// lanes ahead and done, applies nothing, and `status`/`wait` with the older folder agree. A
// replica with a newer folder (slow 4) then continues from 3, and the old replica hears of it.
func TestFaultRollbackDeploy(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 2)
	dbURL := pgtest.NewDB(t)
	older := map[string]string{
		"fast/001_runs.sql": "create table runs (lane text not null, version int not null, app text not null default current_setting('application_name'));",
		"slow/001_s.sql":    "insert into runs (lane, version) values ('slow', 1);",
		"slow/002_s.sql":    "insert into runs (lane, version) values ('slow', 2);",
	}
	newer := union(older, map[string]string{
		"fast/002_f.sql": "insert into runs (lane, version) values ('fast', 2);",
		"slow/003_s.sql": "insert into runs (lane, version) values ('slow', 3);",
	})
	newest := union(newer, map[string]string{"slow/004_s.sql": "insert into runs (lane, version) values ('slow', 4);"})
	olderDir, newerDir, newestDir := testkit.WriteTree(t, older), testkit.WriteTree(t, newer), testkit.WriteTree(t, newest)

	if res := runLanes(t, []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + newerDir, "PGAPPNAME=lanes-newer"}, "migrate"); res.code != 0 {
		t.Fatalf("migrate with the newer folder: %v", res)
	}
	old := startReplica(t, "old", dbURL, olderDir)
	testkit.Eventually(t, "the old replica ready", 30*time.Second, old.ready)
	testkit.Eventually(t, "the old replica knows both lanes are done", 30*time.Second, func() bool {
		v, ok := old.view()
		return ok && len(v.Lanes) == 2 && v.Lanes[0].Done && v.Lanes[1].Done
	})
	st := old.status(t)
	for i, want := range []struct {
		version, latest int32
	}{{2, 1}, {3, 2}} {
		l := st.Lanes[i]
		if l.State != migrator.StateAhead || l.Version != want.version || l.Latest != want.latest {
			t.Errorf("old replica's /lanes %s: state %s version %d latest %d; want ahead %d/%d", l.Name, l.State, l.Version, l.Latest, want.version, want.latest)
		}
	}
	if !strings.Contains(old.log.String(), "database is ahead of this binary") {
		t.Error("the old replica did not warn that the database is ahead of it")
	}
	oldEnv := []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + olderDir}
	res := runLanes(t, oldEnv, "status", "--json")
	var sj struct{ Lanes []migrator.LaneStatus }
	if res.code != 0 || json.Unmarshal([]byte(res.stdout), &sj) != nil || len(sj.Lanes) != 2 || sj.Lanes[0].State != migrator.StateAhead || sj.Lanes[1].State != migrator.StateAhead {
		t.Errorf("status --json with the older folder: %v", res)
	}
	if res := runLanes(t, oldEnv, "wait", "--lane", "slow", "--timeout", "20s"); res.code != 0 {
		t.Errorf("wait --lane slow with the older folder: %v", res)
	}

	next := startReplica(t, "newest", dbURL, newestDir)
	testkit.Eventually(t, "the newest replica ready", 30*time.Second, next.ready)
	testkit.Eventually(t, "the newest replica applies slow version 4", 30*time.Second, func() bool {
		k, ok := next.knows("slow")
		return ok && k.Done && k.Version == 4
	})
	testkit.Eventually(t, "the old replica hears of version 4", 30*time.Second, func() bool {
		k, ok := old.knows("slow")
		return ok && k.Version == 4
	})
	if !old.ready() {
		t.Error("the old replica is no longer ready")
	}
	conn := pgtest.Connect(t, dbURL)
	runs := map[string]int{}
	rows, err := conn.Query(t.Context(), "select lane || ':' || version || ':' || app from runs")
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range got {
		runs[r]++
	}
	want := map[string]int{"fast:2:lanes-newer": 1, "slow:1:lanes-newer": 1, "slow:2:lanes-newer": 1, "slow:3:lanes-newer": 1, "slow:4:lanes-newest": 1}
	if fmt.Sprint(runs) != fmt.Sprint(want) {
		t.Errorf("runs = %v, want %v", runs, want)
	}
	checkHistoryExactlyOnce(t, conn, 6)
	if strings.Contains(old.log.String(), `"level":"error"`) {
		t.Errorf("the old replica logged errors:\n%s", old.log.String())
	}
}

// union returns the union of a and b (b wins).
func union(a, b map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// TestFaultHistoryAndDriftAtTheCommandLine runs `lanes migrate` processes: each history row
// names lane, version, file, checksum of the rendered SQL, start, finish, duration and the
// replica (host, pid, application_name); a failed attempt records its error, SQLSTATE and
// statement; an applied file that changes shows as drift in `status --json`, makes `migrate`
// exit 1 naming the file (applying nothing), and `migrate --allow-drift` goes on.
func TestFaultHistoryAndDriftAtTheCommandLine(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 1)
	dbURL := pgtest.NewDB(t)
	files := map[string]string{
		"fast/001_items.sql": "create table items (id int primary key);",
		"slow/001_fill.sql":  "insert into items select generate_series(1, 10);",
	}
	dir := testkit.WriteTree(t, files)
	env := []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir, "PGAPPNAME=lanes-historian"}
	p := startLanes(t, env, "migrate")
	if code, _ := p.wait(t, time.Minute); code != 0 {
		t.Fatalf("migrate exited %d:\n%s", code, p.stderr.String())
	}
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	conn := pgtest.Connect(t, dbURL)
	type row struct {
		Lane, Name, Checksum, Host, AppName string
		Version, PID                        int32
		Started, Finished                   time.Time
		Duration                            time.Duration
		Error, SQLState, Statement          *string
	}
	history := func() []row {
		rows, err := conn.Query(t.Context(), `select lane, name, checksum, host, application_name, version, pid, started_at, finished_at, duration, error, sqlstate, statement
from lanes_history order by id`)
		if err != nil {
			t.Fatal(err)
		}
		out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[row])
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	sum := func(content string) string {
		s := sha256.Sum256([]byte(strings.TrimSpace(content))) // tern trims the up SQL, then renders it
		return hex.EncodeToString(s[:])
	}
	h := history()
	if len(h) != 2 {
		t.Fatalf("history = %+v, want two rows", h)
	}
	for i, want := range []struct{ lane, file string }{{"fast", "001_items.sql"}, {"slow", "001_fill.sql"}} {
		r := h[i]
		if r.Lane != want.lane || r.Version != 1 || r.Name != want.file || r.Checksum != sum(files[want.lane+"/"+want.file]) ||
			r.Host != host || int(r.PID) != p.cmd.Process.Pid || r.AppName != "lanes-historian" || r.Error != nil {
			t.Errorf("history row %d = %+v; want lane %s version 1 file %s, checksum of its SQL, host %s, pid %d, application lanes-historian",
				i, r, want.lane, want.file, host, p.cmd.Process.Pid)
		}
		if r.Finished.Before(r.Started) || r.Duration != r.Finished.Sub(r.Started) || r.Started.Before(time.Now().Add(-5*time.Minute)) {
			t.Errorf("history row %d: started %s finished %s duration %s", i, r.Started, r.Finished, r.Duration)
		}
	}

	// A failed attempt is recorded with its error.
	writeFile(t, dir, "slow/002_dup.sql", "insert into items values (1);")
	p = startLanes(t, env, "migrate")
	if code, _ := p.wait(t, time.Minute); code != 1 || !strings.Contains(p.stderr.String(), "002_dup.sql") {
		t.Fatalf("migrate of a failing file: exit %d:\n%s", code, p.stderr.String())
	}
	h = history()
	if f := h[len(h)-1]; f.Lane != "slow" || f.Version != 2 || f.Name != "002_dup.sql" || f.Error == nil || !strings.Contains(*f.Error, "duplicate key") ||
		f.SQLState == nil || *f.SQLState != "23505" || f.Statement == nil || strings.TrimSuffix(*f.Statement, ";") != "insert into items values (1)" || int(f.PID) != p.cmd.Process.Pid {
		t.Errorf("failed attempt recorded as %+v", f)
	}

	// An applied file changes: status shows drift, migrate refuses, --allow-drift goes on.
	writeFile(t, dir, "slow/001_fill.sql", "insert into items select generate_series(1, 20);")
	writeFile(t, dir, "slow/002_dup.sql", "insert into items values (100);")
	res := runLanes(t, env, "status", "--json")
	var sj struct{ Lanes []migrator.LaneStatus }
	if res.code != 0 || json.Unmarshal([]byte(res.stdout), &sj) != nil || len(sj.Lanes) != 2 || !slices.Equal(sj.Lanes[1].Drift, []string{"001_fill.sql"}) || len(sj.Lanes[0].Drift) != 0 {
		t.Errorf("status --json after 001_fill.sql changed: want drift [001_fill.sql] on the slow lane: %v", res)
	}
	res = runLanes(t, env, "migrate")
	if res.code != 1 || !strings.Contains(res.stderr, "001_fill.sql") || !strings.Contains(res.stderr, "allow drift") {
		t.Errorf("migrate with a changed applied file: want exit 1 naming 001_fill.sql: %v", res)
	}
	if v := pgtest.Scalar[int](t, conn, "select version from lanes_slow_version"); v != 1 {
		t.Errorf("migrate refused but the slow lane moved to version %d", v)
	}
	res = runLanes(t, env, "migrate", "--allow-drift")
	if res.code != 0 || pgtest.Scalar[int](t, conn, "select version from lanes_slow_version") != 2 {
		t.Errorf("migrate --allow-drift: %v", res)
	}
}

func writeFile(t *testing.T, dir, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, filepath.FromSlash(name)), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestFaultMalformedFoldersApplyNothing runs `lanes migrate` and `lanes serve` on malformed
// migrations folders: each exits 1 with an error naming the lane and the file (or folder) at
// fault, and nothing at all is applied, not even the valid fast lane that comes first.
func TestFaultMalformedFoldersApplyNothing(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 1)
	dbURL := pgtest.NewDB(t)
	conn := pgtest.Connect(t, dbURL)
	fast := map[string]string{"fast/001_ok.sql": "create table fast_ok (i int);"}
	for _, tc := range []struct {
		name  string
		files map[string]string
		env   []string
		want  []string
	}{
		{"gap", map[string]string{"slow/001_a.sql": "create table a (i int);", "slow/003_c.sql": "create table c (i int);"}, nil,
			[]string{`lane "slow"`, "003_c.sql", "missing migration 2"}},
		{"duplicate", map[string]string{"slow/001_a.sql": "create table a (i int);", "slow/001_b.sql": "create table b (i int);"}, nil,
			[]string{`lane "slow"`, "001_b.sql", "duplicate migration 1", "001_a.sql"}},
		{"numbered 0", map[string]string{"slow/000_zero.sql": "create table z (i int);", "slow/001_a.sql": "create table a (i int);"}, nil,
			[]string{`lane "slow"`, "000_zero.sql", "start at 1"}},
		{"badly named", map[string]string{"slow/001_a.sql": "create table a (i int);", "slow/second.sql": "create table b (i int);"}, nil,
			[]string{`lane "slow"`, "second.sql", "NNN_title.sql"}},
		{"empty lane", map[string]string{"slow/README.md": "nothing yet"}, nil,
			[]string{`lane "slow"`, "no migrations"}},
		{"no SQL", map[string]string{"slow/001_a.sql": "-- to do\n"}, nil,
			[]string{`lane "slow"`, "001_a.sql", "no SQL statement"}},
		{"template syntax", map[string]string{"slow/001_t.sql": "select {{ .Oops"}, nil,
			[]string{`lane "slow"`, "001_t.sql"}},
		{"template value", map[string]string{"slow/001_t.sql": "create table {{ .Table }} (i int);"}, nil,
			[]string{`lane "slow"`, "001_t.sql", "<no value>"}},
		{"undeclared lane folder", map[string]string{"slow/001_a.sql": "create table a (i int);", "reports/001_r.sql": "create table r (i int);"}, nil,
			[]string{`"reports"`, "not a declared lane"}},
		{"declared lane without folder", map[string]string{"slow/001_a.sql": "create table a (i int);"}, []string{"LANES_LANES=fast,slow,extra:background"},
			[]string{`lane "extra"`, `no folder "extra"`}},
		{"not UTF-8", map[string]string{"slow/001_bin.sql": "create table bin (t text default '\xff\xfe');"}, nil,
			[]string{`lane "slow"`, "001_bin.sql", "UTF-8"}},
	} {
		dir := testkit.WriteTree(t, union(fast, tc.files))
		env := append([]string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir, "LANES_LOG_FORMAT=console"}, tc.env...)
		for _, args := range [][]string{{"migrate"}, {"serve", "--addr", "127.0.0.1:0"}} {
			res := runLanes(t, env, args...)
			if res.code != 1 {
				t.Errorf("%s: lanes %s: want exit 1, got %v", tc.name, args[0], res)
			}
			for _, w := range tc.want {
				if !strings.Contains(res.stderr, w) {
					t.Errorf("%s: lanes %s: the error does not say %q:\n%s", tc.name, args[0], w, res.stderr)
				}
			}
			if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_class where relnamespace = 'public'::regnamespace"); n != 0 {
				t.Fatalf("%s: lanes %s applied something: %d relations in the database", tc.name, args[0], n)
			}
		}
	}
}

// TestFaultBadCredentialsAndUnreachableServers checks what a bad database URL costs: a wrong
// password (against a throwaway server whose pg_hba.conf demands scram-sha-256, since the local
// server trusts every local connection and would accept any password), a refused port, a server
// that accepts TCP connections but never answers, and a host that does not resolve. Every
// command fails with an error naming the server, within its bound, and never prints the
// password: the one-shot commands with exit 4 (no usable database; after retrying for their
// --timeout unless the password was refused), serve with exit 1 on a refused password (it keeps
// trying otherwise).
func TestFaultBadCredentialsAndUnreachableServers(t *testing.T) {
	t.Parallel()
	hbaDir, err := os.MkdirTemp("", "lanes-hba-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(hbaDir) })
	hba := filepath.Join(hbaDir, "pg_hba.conf")
	// The server runs as the postgres OS user when the tests run as root: it must read the file.
	if err := os.Chmod(hbaDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(hba, []byte("local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := startCluster(t, pgcluster.Options{Params: map[string]string{"hba_file": hba, "password_encryption": "scram-sha-256"}})
	admin := pgtest.Connect(t, c.ConnString("postgres"))
	const right, wrong = "Right-pa55word", "Wr0ng-s3cret-XYZ"
	for _, sql := range []string{"create role app_user login password '" + right + "'", "create database appdb owner app_user"} {
		if _, err := admin.Exec(t.Context(), sql); err != nil {
			t.Fatal(err)
		}
	}
	dir := testkit.WriteTree(t, map[string]string{"fast/001_a.sql": "create table a (i int);", "slow/001_b.sql": "create table b (i int);"})
	url := func(password string) string {
		return fmt.Sprintf("postgres://app_user:%s@127.0.0.1:%d/appdb?sslmode=disable", password, c.Port())
	}
	// The right password works: the server really checks passwords.
	if res := runLanes(t, []string{"DATABASE_URL=" + url(right), "LANES_MIGRATIONS=" + dir}, "migrate"); res.code != 0 || strings.Contains(res.stdout+res.stderr, right) {
		t.Fatalf("migrate with the right password: %v", res)
	}

	// A server that accepts connections and never says a word.
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held sync.WaitGroup
	held.Go(func() {
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	})
	t.Cleanup(func() {
		silent.Close()
		held.Wait()
	})
	const secret = "S3cret-unreach"
	silentPort := silent.Addr().(*net.TCPAddr).Port

	type target struct {
		name, secret, host string
		env                []string
		bound              time.Duration
	}
	targets := []target{
		{"wrong password in the URL", wrong, "127.0.0.1", []string{"DATABASE_URL=" + url(wrong)}, slack},
		{"wrong password as keywords", wrong, "127.0.0.1",
			[]string{fmt.Sprintf("DATABASE_URL=host=127.0.0.1 port=%d user=app_user password=%s dbname=appdb sslmode=disable", c.Port(), wrong)}, slack},
		{"wrong PGPASSWORD", wrong, "127.0.0.1",
			[]string{fmt.Sprintf("DATABASE_URL=postgres://app_user@127.0.0.1:%d/appdb?sslmode=disable", c.Port()), "PGPASSWORD=" + wrong}, slack},
		{"refused port", secret, "127.0.0.1", []string{"DATABASE_URL=postgres://u:" + secret + "@127.0.0.1:1/db?sslmode=disable"}, slack},
		{"silent server, connect_timeout=2", secret, "127.0.0.1",
			[]string{fmt.Sprintf("DATABASE_URL=postgres://u:%s@127.0.0.1:%d/db?sslmode=disable&connect_timeout=2", secret, silentPort)}, 2*time.Second + slack},
		{"silent server, default timeout", secret, "127.0.0.1",
			[]string{fmt.Sprintf("DATABASE_URL=postgres://u:%s@127.0.0.1:%d/db?sslmode=disable", secret, silentPort)}, connectTimeout + slack},
		{"unresolvable host", secret, "no-such-host.invalid",
			[]string{"DATABASE_URL=postgres://u:" + secret + "@no-such-host.invalid:5432/db?sslmode=disable&connect_timeout=5"}, 5*time.Second + slack},
	}
	// The one-shot commands retry while no usable database answers, for their --timeout (1 s
	// here), and then exit 4, as they do at once on a refused password.
	commands := [][]string{{"status", "--timeout", "1s"}, {"migrate", "--timeout", "1s"}, {"wait", "--lane", "slow", "--timeout", "1s"}, {"serve", "--addr", "127.0.0.1:0"}}
	// serve keeps trying while no usable database answers (TestServeWaitsForAPrimary): it exits
	// only on a refused password.
	runs := func(tg target, args []string) bool { return args[0] != "serve" || tg.secret == wrong }
	// The silent server's cases each take their timeout: start them first, and everything in
	// at most six processes at a time, so that the load of starting -race binaries on two cores
	// stays out of the figures.
	slices.SortStableFunc(targets, func(a, b target) int { return int(b.bound - a.bound) })
	type outcome struct {
		target target
		args   []string
		res    cliRun
		err    error
	}
	bin := lanesBinary(t)
	var wg sync.WaitGroup
	outcomes := make(chan outcome, len(targets)*len(commands))
	slots := make(chan struct{}, 6)
	for _, tg := range targets {
		for _, args := range commands {
			if !runs(tg, args) {
				continue
			}
			slots <- struct{}{}
			wg.Go(func() {
				defer func() { <-slots }()
				env := append([]string{"LANES_MIGRATIONS=" + dir, "LANES_LOG_FORMAT=console", "PGPASSWORD="}, tg.env...)
				res, err := execLanes(t.Context(), bin, env, args...)
				outcomes <- outcome{tg, args, res, err}
			})
		}
	}
	wg.Wait()
	close(outcomes)
	slowest := map[string]time.Duration{}
	for o := range outcomes {
		what := fmt.Sprintf("%s: lanes %s", o.target.name, o.args[0])
		if o.err != nil {
			t.Errorf("%s: %v", what, o.err)
			continue
		}
		out := o.res.stdout + o.res.stderr
		switch {
		case o.args[0] != "serve" && o.res.code != 4:
			t.Errorf("%s: want exit 4 (no usable database), got %v", what, o.res)
		case o.args[0] == "serve" && o.res.code != 1:
			t.Errorf("%s: want exit 1, got %v", what, o.res)
		case strings.Contains(out, o.target.secret):
			t.Errorf("%s: the password was printed:\n%s", what, out)
		case !strings.Contains(o.res.stderr, o.target.host):
			t.Errorf("%s: the error does not name the server %s:\n%s", what, o.target.host, o.res.stderr)
		case o.res.took > o.target.bound:
			t.Errorf("%s: failed after %s, want within %s", what, o.res.took, o.target.bound)
		case o.target.secret == wrong && !strings.Contains(o.res.stderr, "password authentication failed"):
			t.Errorf("%s: the error does not say the password was refused:\n%s", what, o.res.stderr)
		}
		slowest[o.target.name] = max(slowest[o.target.name], o.res.took)
	}
	for _, tg := range targets {
		name := strings.NewReplacer(" ", "_", ",", "", "=", "").Replace(tg.name)
		figure(t, "error_after_"+name, slowest[tg.name], tg.bound)
	}
}

// TestFaultSigtermDuringSlowMigration sends SIGTERM to the replica applying the slow lane in the
// middle of its long migration: it exits 0 promptly, its transaction is rolled back (nothing of
// the migration is visible), its lock is released at once, and the other replica takes the lane
// over within one takeover interval and finishes it. (The in-process test
// app.TestCloseStopsARunningMigration checks that no goroutine is left behind.)
func TestFaultSigtermDuringSlowMigration(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 2)
	dbURL := pgtest.NewDB(t)
	dir := runsLanes(t)
	key := lockKey(t, dbURL, dir, "slow")
	conn := pgtest.Connect(t, dbURL)
	rs := map[string]*replica{}
	for _, name := range []string{"t1", "t2"} {
		rs["lanes-"+name] = startReplica(t, name, dbURL, dir)
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" ready", 60*time.Second, r.ready)
	}
	h := waitForHolder(t, conn, key, "pg_sleep")
	victim, survivor := rs[h.app], rs["lanes-t1"]
	if survivor == victim {
		survivor = rs["lanes-t2"]
	}
	if victim == nil {
		t.Fatalf("the slow lane's lock is held by %q, not by a replica", h.app)
	}
	hurryUp(t, conn) // for the survivor's run; the running one sleeps on
	if err := victim.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	termed := time.Now()
	// The cancel request, the rollback, the unlock and the HTTP shutdown take milliseconds; a
	// replica whose cancel request went unanswered would wait for pgx's 5 s deadline instead.
	const exitBound = 4 * time.Second
	select {
	case err := <-victim.done:
		victim.done <- err // for the cleanup
		if err != nil {
			t.Fatalf("replica %s exited with %v after SIGTERM", victim.name, err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("replica %s still runs 60 s after SIGTERM", victim.name)
	}
	exited := time.Since(termed)
	// The survivor may already have taken the lane over and committed its own 002 (the released
	// event makes it try at once), so only the stopped replica's own rows tell what it left.
	// Its row and long_made share one transaction: no row means it was rolled back, and the
	// survivor's re-run of 002 (checked below), which would fail on an existing long_made,
	// proves it again.
	if n := pgtest.Scalar[int](t, conn, "select count(*) from runs where version = 2 and app = $1", h.app); n != 0 {
		t.Errorf("the stopped migration's row is in runs: its transaction was not rolled back")
	}
	if cur, ok := lockHolder(t, conn, key); ok && cur.app == h.app {
		t.Error("the stopped replica still holds the lane's lock")
	}
	testkit.Eventually(t, "the stopped replica's sessions end", 5*time.Second, func() bool {
		return pgtest.Scalar[int](t, conn, "select count(*) from pg_stat_activity where datname = current_database() and application_name = $1", h.app) == 0
	})
	var took time.Duration
	testkit.Eventually(t, "the survivor takes the slow lane over", 60*time.Second, func() bool {
		cur, ok := lockHolder(t, conn, key)
		took = time.Since(termed) - exited
		return ok && cur.app == survivor.appName()
	})
	figure(t, "exit_after_sigterm", exited, exitBound)
	figure(t, "takeover_after_sigterm", took, releasedBound)
	if exited > exitBound {
		t.Errorf("exit %s after SIGTERM, want within %s", exited, exitBound)
	}
	if took > releasedBound {
		t.Errorf("takeover %s after the stopped replica exited, want within %s", took, releasedBound)
	}
	log := victim.log.String()
	if !strings.Contains(log, "stopped gracefully") || strings.Contains(log, "could not release the lane lock") {
		t.Errorf("the stopped replica's log:\n%s", log)
	}
	testkit.Eventually(t, "the survivor finishes the slow lane", 60*time.Second, func() bool {
		k, ok := survivor.knows("slow")
		return ok && k.Done
	})
	runs := runsByVersion(t, conn)
	if !slices.Equal(runs[1], []string{h.app}) || !slices.Equal(runs[2], []string{survivor.appName()}) || !slices.Equal(runs[3], []string{survivor.appName()}) {
		t.Errorf("runs = %v; want 1 by %s, 2 and 3 once by %s", runs, h.app, survivor.appName())
	}
	checkHistoryExactlyOnce(t, conn, 4)
}
