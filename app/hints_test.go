package app_test

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

// counter counts the sessions a replica opens (its connections' AfterConnect) and the
// statements it sends (a pgx tracer sees every Exec and Query).
type counter struct{ sessions, statements atomic.Int64 }

func (c *counter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	c.statements.Add(1)
	return ctx
}

func (c *counter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// counted returns a copy of cc whose sessions and statements c counts.
func (c *counter) counted(cc *pgx.ConnConfig) *pgx.ConnConfig {
	cc = cc.Copy()
	cc.AfterConnect = func(context.Context, *pgconn.PgConn) error {
		c.sessions.Add(1)
		return nil
	}
	cc.Tracer = c
	return cc
}

// startCountedWaiters starts one replica per counter, its statements and sessions counted, with
// no backstop timer and no lock check (neither the listener's ping nor a successor's check):
// what they do is what the notifications make them do. hintInterval 0 is the default.
func startCountedWaiters(t *testing.T, e *env, g *gate, counters []*counter, hintInterval time.Duration) []*app.Runtime {
	t.Helper()
	var waiters []*app.Runtime
	for _, c := range counters {
		m, err := migrator.New(c.counted(e.cc), []migrator.Lane{fastLane, slowLane(g)}, migrator.Config{})
		if err != nil {
			t.Fatal(err)
		}
		r, err := app.New(m, app.Config{Logger: zerolog.New(os.Stderr).Level(zerolog.InfoLevel), TakeoverInterval: time.Hour, HintInterval: hintInterval,
			SuccessorInterval: time.Hour, FleetInterval: time.Hour, Notifier: notifier.Config{PingInterval: time.Hour}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		if err := r.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		waiters = append(waiters, r)
	}
	return waiters
}

// floodSize is how many spoofed notifications TestAFloodOfHintsCostsABoundedRate sends.
const floodSize = 10_000

// A flood of well-formed spoofed notifications (any role may NOTIFY the lanes' channel) costs a
// waiting replica no session and a number of statements bounded by the time the flood lasts,
// not by its size; a real completion right after the flood is still learned by notification.
// Before hints were rate-limited, each spoofed "released" woke the waiting goroutine, which
// opened a session to try the lane's lock, and each hint cost a read.
func TestAFloodOfHintsCostsABoundedRate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	// The third session: a replica applying the slow lane, stuck in its first migration.
	applier := e.replica(fastLane, slowLane(g))
	waitStarted(t, g)

	const interval = 200 * time.Millisecond
	counters := []*counter{{}, {}}
	waiters := startCountedWaiters(t, e, g, counters, interval)
	testkit.Eventually(t, "both replicas wait for the applier", 10*time.Second, func() bool {
		return waiters[0].View().Lanes[1].Role == "waiting" && waiters[1].View().Lanes[1].Role == "waiting"
	})
	type snapshot struct{ sessions, statements int64 }
	var before []snapshot
	var received []int
	for i, c := range counters {
		before = append(before, snapshot{c.sessions.Load(), c.statements.Load()})
		received = append(received, waiters[i].View().Notifications)
	}

	// Five kinds of well-formed hints about the slow lane, each payload distinct (identical
	// payloads of one transaction are folded into one), sent in one transaction.
	began := time.Now()
	e.exec(`select pg_notify('lanes_done', case g % 5
  when 0 then json_build_object('lane', 'slow', 'version', 1 + g, 'state', 'released')
  when 1 then json_build_object('lane', 'slow', 'version', 1 + g, 'state', 'applied', 'file', 'x.sql')
  when 2 then json_build_object('lane', 'slow', 'version', 99 + g, 'state', 'done')
  when 3 then json_build_object('lane', 'slow', 'version', 1, 'progress', json_build_object('done', g, 'total', 1000000))
  else json_build_object('lane', 'slow', 'version', 1 + g, 'state', 'failed') end::text)
from generate_series(1, $1) g`, floodSize)
	for i, r := range waiters {
		testkit.Eventually(t, fmt.Sprintf("replica %d receives the flood", i), 5*time.Minute, func() bool { // a hang guard: about 5 s on an idle machine
			return r.View().Notifications >= received[i]+floodSize
		})
	}
	elapsed := time.Since(began)
	// Per kind of reaction (the slow lane's version read, its lock check, the full status read):
	// 3 at once, then one per interval over the flood, plus one pending when it ends. Each
	// costs at most statementsPerReaction.
	const statementsPerReaction = 8
	windows := int64(elapsed/interval) + 1
	bound := 3 * (3 + windows + 1) * statementsPerReaction
	for i, c := range counters {
		sessions, statements := c.sessions.Load()-before[i].sessions, c.statements.Load()-before[i].statements
		t.Logf("replica %d: %d notifications in %s: %d sessions opened, %d statements (bound %d)",
			i, floodSize, elapsed.Round(time.Millisecond), sessions, statements, bound)
		if sessions != 0 {
			t.Errorf("replica %d opened %d sessions during a flood of %d spoofed hints, want 0", i, sessions, floodSize)
		}
		if statements > bound {
			t.Errorf("replica %d sent %d statements during a flood of %d hints lasting %s, want at most %d", i, statements, floodSize, elapsed, bound)
		}
		if waiters[i].IsDone("slow") || waiters[i].View().Lanes[1].Role != "waiting" {
			t.Errorf("replica %d after the flood: done=%v role=%q; want still waiting", i, waiters[i].IsDone("slow"), waiters[i].View().Lanes[1].Role)
		}
	}

	// The real completion, right after the flood, is learned through its notification.
	close(g.release)
	waitDone(t, applier, "slow")
	applied := time.Now()
	for i, r := range waiters {
		waitDone(t, r, "slow")
		if via := r.View().Lanes[1].Via; via != "notification" {
			t.Errorf("replica %d learned the completion via %q, want notification", i, via)
		}
		t.Logf("replica %d learned the completion %s after the applier", i, time.Since(applied).Round(time.Millisecond))
	}
	if n := g.runs.Load(); n != 1 {
		t.Fatalf("slow migration ran %d times, want 1", n)
	}
}

// While a lane runs, a notification from the backend that holds the lane's lock is trusted
// without a read, and anything else is verified: an attacker's backend sending a well-formed
// "done" payload costs the waiting replicas a verifying read and makes nothing done; the
// holder's own completion then costs them no statement at all (before, every replica re-read
// the lane's version after each notification, the holder's included).
func TestHolderNotificationsNeedNoRead(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	applier := e.replica(fastLane, slowLane(g))
	waitStarted(t, g)

	counters := []*counter{{}, {}}
	waiters := startCountedWaiters(t, e, g, counters, 0)
	testkit.Eventually(t, "both replicas wait, knowing the lock's holder", time.Minute, func() bool {
		for _, r := range waiters {
			if k := r.View().Lanes[1]; k.Role != "waiting" || k.HolderPID == 0 {
				return false
			}
		}
		return true
	})
	statements := func() []int64 {
		var out []int64
		for _, c := range counters {
			out = append(out, c.statements.Load())
		}
		return out
	}

	// The attacker: a well-formed "done" of the slow lane's latest version, while it runs.
	before, received := statements(), []int{waiters[0].View().Notifications, waiters[1].View().Notifications}
	e.exec(`select pg_notify('lanes_done', '{"lane":"slow","version":2,"state":"done","file":"002_after.sql"}')`)
	for i, r := range waiters {
		testkit.Eventually(t, fmt.Sprintf("replica %d verifies the spoofed completion", i), time.Minute, func() bool {
			return r.View().Notifications > received[i] && counters[i].statements.Load() > before[i]
		})
		if r.IsDone("slow") {
			t.Fatalf("replica %d believes a spoofed completion", i)
		}
	}

	// The holder's completion: no statement at all.
	before = statements()
	close(g.release)
	waitDone(t, applier, "slow")
	for i, r := range waiters {
		waitDone(t, r, "slow")
		if via := r.View().Lanes[1].Via; via != "notification" {
			t.Errorf("replica %d learned the completion via %q, want notification", i, via)
		}
		if n := counters[i].statements.Load() - before[i]; n != 0 {
			t.Errorf("replica %d sent %d statements to learn its lane's holder completed it, want 0", i, n)
		}
	}
}
