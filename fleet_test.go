package main

// Fleet tests (issue 11): what a fleet of `lanes serve` replicas costs and how it behaves when
// its members die, at process level.

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
)

// TestFaultTakeoverBySuccessor runs five replicas on a slow lane whose migrations each sleep a
// minute. First the lane's designated successor is killed (SIGKILL): another waiting replica
// takes its place. Then, three times in a row, the replica applying the lane is killed in the
// middle of its statement: each time another replica holds the lane within
// connCheckInterval + successorInterval + slack (the server frees the dead session's lock
// within connCheckInterval, the successor sees it free within successorInterval); before,
// every waiting replica checked the lock only every 5 s (its listener's ping). Every migration is
// recorded once in the end.
func TestFaultTakeoverBySuccessor(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 5)
	dbURL := pgtest.NewDB(t)
	files := map[string]string{
		"fast/001_runs.sql": `create table runs (version int not null, app text not null default current_setting('application_name'));
create table hurry (at timestamptz not null default now());`,
	}
	for v := 1; v <= 3; v++ {
		files[fmt.Sprintf("slow/%03d_long.sql", v)] = fmt.Sprintf(`insert into runs (version) values (%d);
select pg_sleep(case when exists (select 1 from hurry) then 0.2 else 60 end);`, v)
	}
	dir := testkit.WriteTree(t, files)
	key := lockKey(t, dbURL, dir, "slow")
	conn := pgtest.Connect(t, dbURL)
	rs := map[string]*replica{}
	for i := range 5 {
		r := startReplica(t, fmt.Sprintf("s%d", i), dbURL, dir)
		rs[r.appName()] = r
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" ready", 2*time.Minute, r.ready)
	}
	successor := func() (*replica, int) {
		var found *replica
		n := 0
		for _, r := range rs {
			if k, ok := r.knows("slow"); ok && k.Successor && k.Role == "waiting" {
				found = r
				n++
			}
		}
		return found, n
	}
	var first *replica
	testkit.Eventually(t, "one waiting replica is the slow lane's successor", 2*time.Minute, func() bool {
		s, n := successor()
		first = s
		return n == 1
	})
	if h := waitForHolder(t, conn, key, "pg_sleep"); h.app == first.appName() {
		t.Fatalf("the successor %s holds the lane", h.app)
	}
	first.kill(t)
	delete(rs, first.appName())
	testkit.Eventually(t, "another replica becomes the successor", 2*time.Minute, func() bool {
		s, n := successor()
		return n == 1 && s != first
	})

	// Without a dead-client check (PostgreSQL 13) the server frees a killed session's lock only
	// when its statement ends (pg_sleep(60) here): the test then ends the session itself right
	// after the kill, standing in for the statement's end, and measures from there.
	deadCheck := hasDeadClientCheck(t, conn)
	bound := connCheckInterval + successorInterval + slack
	if !deadCheck {
		bound = successorInterval + slack
	}
	var took []float64
	for round := range 3 {
		h := waitForHolder(t, conn, key, "pg_sleep")
		victim := rs[h.app]
		if victim == nil {
			t.Fatalf("the slow lane's lock is held by %q, not by a replica", h.app)
		}
		// Let the survivors settle on a successor before the kill, as between deploys.
		testkit.Eventually(t, "a successor among the survivors", 2*time.Minute, func() bool {
			s, n := successor()
			return n == 1 && s != victim
		})
		victim.kill(t)
		killed := time.Now()
		delete(rs, h.app)
		if !deadCheck {
			if _, err := conn.Exec(t.Context(), "select pg_terminate_backend($1)", h.pid); err != nil {
				t.Fatal(err)
			}
			testkit.Eventually(t, "the killed replica's session ended", 2*time.Minute, func() bool {
				return pgtest.Scalar[int](t, conn, "select count(*) from pg_stat_activity where pid = $1", h.pid) == 0
			})
			killed = time.Now()
		}
		var d time.Duration
		testkit.Eventually(t, "another replica takes the slow lane over", 2*time.Minute, func() bool {
			cur, ok := lockHolder(t, conn, key)
			if ok && cur.pid != h.pid {
				d = time.Since(killed)
				return true
			}
			return false
		})
		figure(t, fmt.Sprintf("takeover_by_successor_%d", round+1), d, bound)
		if d > bound {
			t.Errorf("round %d: takeover %s after the kill, want within %s", round+1, d, bound)
		}
		took = append(took, d.Seconds())
	}
	slices.Sort(took)
	t.Logf("takeovers after SIGKILL: %v s (median %.2f s, max %.2f s)", took, took[len(took)/2], took[len(took)-1])

	hurryUp(t, conn)
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" learns the slow lane is done", 3*time.Minute, func() bool {
			k, ok := r.knows("slow")
			return ok && k.Done
		})
	}
	checkHistoryExactlyOnce(t, conn, 4)
}

// TestFaultDoneReplicaHoldsNoConnection: a `lanes serve` replica whose lanes are all done holds
// no server session at all (pg_stat_activity by its application_name), where it used to keep
// its LISTEN connection for ever; /lanes reads with a short-lived connection and leaves none;
// a lane moving backwards (seen by that read) makes it connect again, apply the lane and close
// again. With LANES_KEEP_LISTENING=1 a replica keeps its one LISTEN connection.
func TestFaultDoneReplicaHoldsNoConnection(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 2)
	dbURL := pgtest.NewDB(t)
	dir := testkit.WriteTree(t, map[string]string{
		"fast/001_a.sql": "create table a (i int);",
		"slow/001_b.sql": "create table if not exists b (i int);",
	})
	conn := pgtest.Connect(t, dbURL)
	sessions := func(r *replica) int {
		return pgtest.Scalar[int](t, conn, "select count(*)::int from pg_stat_activity where datname = current_database() and application_name = $1", r.appName())
	}
	idle := startReplica(t, "idle", dbURL, dir)
	keep := startReplica(t, "keep", dbURL, dir, "LANES_KEEP_LISTENING=1")
	for _, r := range []*replica{idle, keep} {
		testkit.Eventually(t, "replica "+r.name+" knows every lane done", 2*time.Minute, func() bool {
			v, ok := r.view()
			return ok && len(v.Lanes) == 2 && v.Lanes[0].Done && v.Lanes[1].Done
		})
	}
	testkit.Eventually(t, "the done replica holds no session", 2*time.Minute, func() bool { return sessions(idle) == 0 })
	testkit.Eventually(t, "the replica told to keep listening says it listens", 2*time.Minute, func() bool {
		v, ok := keep.view()
		return ok && v.Listener == "listening"
	})
	// Counted apart from view (each view is a /lanes read on a connection of its own), and in
	// this database only: another suite running this test at once against the same server has
	// replicas of the same names (which made CI fail twice beside a second suite).
	testkit.Eventually(t, "the replica told to keep listening holds its listener only", 2*time.Minute, func() bool { return sessions(keep) == 1 })
	if v, _ := idle.view(); v.Listener != "idle" {
		t.Errorf("the done replica's listener is %q, want idle", v.Listener)
	}
	if code, _ := idle.get("/lanes"); code != 200 {
		t.Fatalf("/lanes = %d", code)
	}
	testkit.Eventually(t, "no session left after /lanes", 2*time.Minute, func() bool { return sessions(idle) == 0 })

	// The slow lane moves backwards: the next /lanes read sees it, and the replica connects
	// again, applies the lane again and closes again.
	if _, err := conn.Exec(t.Context(), "update lanes_slow_version set version = 0"); err != nil {
		t.Fatal(err)
	}
	idle.get("/lanes")
	testkit.Eventually(t, "the replica applies the slow lane again", 2*time.Minute, func() bool {
		k, ok := idle.knows("slow")
		return ok && k.Regressed != nil && k.Done
	})
	testkit.Eventually(t, "and holds no session again", 2*time.Minute, func() bool { return sessions(idle) == 0 })
	if !strings.Contains(idle.log.String(), "connecting the listener again") {
		t.Error("the replica did not say it connected its listener again")
	}
}

// TestFaultFleetBackoff: a background migration fails on lock_timeout while another session
// holds its table, under three `lanes serve` replicas. The retry schedule is stored with the
// lane, so the fleet makes at most 8 attempts in 30 s (before, each replica's backoff restarted
// whenever another one held the lane: 30 attempts in 30 s); each attempt is logged by the one
// replica that made it; `lanes status` shows when the next attempt is due; once the table is
// free the lane is applied, once.
func TestFaultFleetBackoff(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 3)
	dbURL := pgtest.NewDB(t)
	conn := pgtest.Connect(t, dbURL)
	if _, err := conn.Exec(t.Context(), "create table busy (i int)"); err != nil {
		t.Fatal(err)
	}
	holder := pgtest.Connect(t, dbURL)
	if _, err := holder.Exec(t.Context(), "begin; lock table busy in access exclusive mode"); err != nil {
		t.Fatal(err)
	}
	dir := testkit.WriteTree(t, map[string]string{
		"fast/001_a.sql": "create table a (i int);",
		"slow/001_b.sql": "set local lock_timeout = '100ms';\ninsert into busy values (1);",
	})
	var rs []*replica
	for i := range 3 {
		rs = append(rs, startReplica(t, fmt.Sprintf("b%d", i), dbURL, dir))
	}
	failures := func() int {
		return pgtest.Scalar[int](t, conn, "select count(*)::int from lanes_history where lane = 'slow' and error is not null")
	}
	testkit.Eventually(t, "a first failed attempt", 2*time.Minute, func() bool {
		return pgtest.Scalar[bool](t, conn, "select to_regclass('lanes_history') is not null") && failures() > 0
	})
	first := pgtest.Scalar[time.Time](t, conn, "select min(started_at) from lanes_history where lane = 'slow' and error is not null")
	// The window the goal is stated over: 30 s from the first attempt (a measurement window,
	// not a wait for an event).
	testkit.Eventually(t, "30 s since the first attempt", 2*time.Minute, func() bool {
		return pgtest.Scalar[bool](t, conn, "select now() > $1::timestamptz + interval '30 s'", first)
	})
	attempts := pgtest.Scalar[int](t, conn, "select count(*)::int from lanes_history where lane = 'slow' and error is not null and started_at < $1::timestamptz + interval '30 s'", first)
	t.Logf("FIGURE fleet_attempts_in_30s=%d (bound 8)", attempts)
	if attempts > 8 {
		t.Errorf("3 replicas made %d attempts in 30 s, want at most 8", attempts)
	}
	res := runLanes(t, []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir}, "status")
	if res.code != 0 || !strings.Contains(res.stdout, "next attempt at") {
		t.Errorf("status does not show the next attempt: %v", res)
	}

	if _, err := holder.Exec(t.Context(), "commit"); err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" learns the slow lane is done", 3*time.Minute, func() bool {
			k, ok := r.knows("slow")
			return ok && k.Done
		})
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*)::int from busy"); n != 1 {
		t.Errorf("busy has %d rows, want 1 (the migration committed once)", n)
	}
	logged := 0
	for _, r := range rs {
		logged += strings.Count(r.log.String(), "retrying at the lane's schedule")
	}
	if total := failures(); logged != total {
		t.Errorf("%d attempts logged by the replicas, %d failed attempts recorded: want each logged once", logged, total)
	}
}
