package app_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

// Eight replicas wait for a lane another replica applies: exactly one of them is the lane's
// designated successor, and what they send the server together is bounded by the successor's
// and the fleet's intervals, not by their number (before, every waiting replica checked the
// lane's lock at every listener check: 8 × 10/s here). When the successor's listener session
// dies, another waiter takes its place; when the applying session dies, the successor takes
// the lane over.
func TestOneSuccessorWatchesTheLockForTheFleet(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	applier := e.replica(fastLane, slowLane(g))
	waitStarted(t, g)

	const (
		waiters   = 8
		successor = 200 * time.Millisecond // SuccessorInterval
		fleet     = 400 * time.Millisecond // FleetInterval
	)
	counters := make([]*counter, waiters)
	rs := make([]*app.Runtime, waiters)
	for i := range rs {
		counters[i] = &counter{}
		cc := counters[i].counted(e.cc)
		cc.RuntimeParams["application_name"] = fmt.Sprintf("waiter-%d", i)
		m, err := migrator.New(cc, []migrator.Lane{fastLane, slowLane(g)}, migrator.Config{})
		if err != nil {
			t.Fatal(err)
		}
		// The listener checks every 100 ms at most; no backstop within the test.
		r, err := app.New(m, app.Config{TakeoverInterval: time.Hour, SuccessorInterval: successor, FleetInterval: fleet,
			RetryMin: time.Hour, RetryMax: time.Hour, Notifier: notifier.Config{PingInterval: 100 * time.Millisecond}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		if err := r.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		rs[i] = r
	}
	successors := func() []int {
		var out []int
		for i, r := range rs {
			if k := r.View().Lanes[1]; k.Role == "waiting" && k.Successor {
				out = append(out, i)
			}
		}
		return out
	}
	testkit.Eventually(t, "every replica waits, one of them the successor", time.Minute, func() bool {
		for _, r := range rs {
			if r.View().Lanes[1].Role != "waiting" {
				return false
			}
		}
		return len(successors()) == 1
	})

	// What the waiters send over a window: the successor's lock checks (one per
	// SuccessorInterval) and the others' tries of the successor key (about one per FleetInterval
	// for all of them), with room for twice that, plus one try each in case a replica joined
	// just before the window.
	before := make([]int64, waiters)
	for i, c := range counters {
		before[i] = c.statements.Load()
	}
	began := time.Now()
	time.Sleep(3 * time.Second) // the window over which the rate is measured, not a proof of an event
	elapsed := time.Since(began)
	var sent int64
	for i, c := range counters {
		sent += c.statements.Load() - before[i]
	}
	bound := int64(2*(float64(elapsed)/float64(successor)+float64(elapsed)/float64(fleet))) + waiters
	t.Logf("%d waiting replicas sent %d statements in %s (bound %d; checking at every listener check would be %d)",
		waiters, sent, elapsed.Round(time.Millisecond), bound, int64(waiters)*int64(elapsed/(100*time.Millisecond)))
	if sent > bound {
		t.Errorf("%d waiting replicas sent %d statements in %s, want at most %d", waiters, sent, elapsed, bound)
	}
	if s := successors(); len(s) != 1 {
		t.Fatalf("successors %v, want exactly one", s)
	}

	// The successor stops (its listener session ends with it): another waiter takes its place.
	first := successors()[0]
	if err := rs[first].Close(); err != nil {
		t.Fatal(err)
	}
	rs = append(rs[:first], rs[first+1:]...)
	testkit.Eventually(t, "another waiter becomes the successor", time.Minute, func() bool {
		return len(successors()) == 1
	})

	// The applying session dies: the successor (whoever it is by then) takes the lane over.
	e.exec(`select pg_terminate_backend(a.pid) from pg_stat_activity a
where a.pid <> pg_backend_pid() and a.datname = current_database() and a.application_name not like 'waiter-%'
  and exists (select from pg_locks l where l.pid = a.pid and l.locktype = 'advisory' and l.granted)`)
	close(g.release)
	for _, r := range append(rs, applier) {
		waitDone(t, r, "slow")
	}
	if n := g.runs.Load(); n != 2 {
		t.Fatalf("slow migration ran %d times, want 2 (the killed run, the takeover)", n)
	}
}
