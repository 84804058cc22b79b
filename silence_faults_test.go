package main

// Process-level tests of a silenced applier (issue 11): the replica applying a lane is cut off
// behind a middlebox that keeps both sockets open (internal/faultproxy forwarding nothing, or
// iptables dropping its packets at random), so that neither TCP keepalives nor
// client_connection_check_interval end its session: the server sees it active, then idle in
// transaction, holding the lane's lock. Another replica must end that session once its
// heartbeat expired (silenceBound) and finish the lane, nothing applied twice; once the path
// heals, the old applier commits nothing.

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/multilanes/lanes/internal/faultproxy"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
)

// silenceBound is migrator.Config.SilenceBound's default (LANES_SILENCE_BOUND): how long an
// applier's heartbeat lives unless renewed.
const silenceBound = 10 * time.Second

// silenceTakeoverBound is how long after an applier went silent another replica holds its
// lane: the heartbeat expires at most silenceBound after the silence began (it was renewed at
// most a third of it before), the lane's successor finds that at its next check and ends the
// session, and finds the lock free at the check after. The goal is 30 s; the tests'
// waits are hang guards of minutes, the figures are logged.
const silenceTakeoverBound = silenceBound + 2*successorInterval + slack

// silenceLanes returns a migrations folder like runsLanes whose long migration waits until
// hurry has a row (see hurryUp), polling every 50 ms: the test silences the applier's path while
// it waits, then lets it end, so that the silenced session goes on to sit idle in transaction,
// holding the lock, as behind a real middlebox. A replica taking the lane over finds the row
// and runs it at once.
func silenceLanes(t *testing.T) string {
	return testkit.WriteTree(t, map[string]string{
		"fast/001_runs.sql": `create table runs (version int not null, app text not null default current_setting('application_name'));
create table hurry (at timestamptz not null default now());`,
		"slow/001_first.sql": "insert into runs (version) values (1);",
		"slow/002_long.sql": `create table long_made (i int);
insert into runs (version) values (2);
do $$ begin while not exists (select 1 from hurry) loop perform pg_sleep(0.05); end loop; end $$;`,
		"slow/003_last.sql": "insert into runs (version) values (3);",
	})
}

// silencer cuts the path of the replicas connecting through a proxy: silence starts it, heal
// ends it.
type silencer struct {
	name          string
	silence, heal func(t *testing.T)
	// selfEnded: only the applier's own connection goes silent, so its heartbeat stays fresh
	// and the applier itself must end its stalled session (no other replica sees it silent).
	selfEnded bool
}

// markedSilencer silences only the connection that sent marker (the applier's: the long
// migration's text), the proxy forwarding every other one, the heartbeat's included: a
// middlebox that lost the state of one connection.
func markedSilencer(p *faultproxy.Proxy, marker string) silencer {
	p.SetMarker(marker)
	return silencer{name: "one connection", selfEnded: true,
		silence: func(*testing.T) { p.SetSilenceMarked(true) },
		heal:    func(*testing.T) { p.SetSilenceMarked(false) }}
}

// blackholeSilencer stops the proxy forwarding anything, both sockets kept open.
func blackholeSilencer(p *faultproxy.Proxy) silencer {
	return silencer{name: "blackhole",
		silence: func(*testing.T) { p.SetBlackhole(true) },
		heal:    func(*testing.T) { p.SetBlackhole(false) }}
}

// packetLoss is the share of packets the iptables partition drops, each direction: all of
// them. With less (one run at 0.95 passed, in 443 s), a retransmission may carry the silenced
// applier's statements through before its heartbeat expires, and whether it or another replica
// finishes the lane becomes a matter of chance.
const packetLoss = "1.0"

// packetLossSilencer drops packets to and from the proxy's port on the loopback interface at
// random (iptables, statistic match): the kernel keeps both connections open and retransmits.
// Only the proxy's port is touched, never the server's.
func packetLossSilencer(t *testing.T, p *faultproxy.Proxy) silencer {
	port := fmt.Sprint(p.Addr().Port)
	rules := [][]string{
		{"INPUT", "-i", "lo", "-p", "tcp", "--dport", port, "-m", "statistic", "--mode", "random", "--probability", packetLoss, "-j", "DROP"},
		{"INPUT", "-i", "lo", "-p", "tcp", "--sport", port, "-m", "statistic", "--mode", "random", "--probability", packetLoss, "-j", "DROP"},
	}
	iptables := func(t *testing.T, op string, rule []string) error {
		out, err := exec.Command("iptables", append([]string{"-w", op}, rule...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("iptables %s %s: %v: %s", op, strings.Join(rule, " "), err, out)
		}
		return nil
	}
	// Fail early when iptables cannot be used here (not root, no netfilter).
	probe := []string{"INPUT", "-i", "lo", "-p", "tcp", "--dport", port, "-j", "ACCEPT"}
	if err := iptables(t, "-A", probe); err != nil {
		if os.Getenv("LANES_TEST_REQUIRE_DB") == "1" {
			t.Fatalf("the packet-loss partition needs iptables as root: %v", err)
		}
		t.Skip(err)
	}
	_ = iptables(t, "-D", probe)
	on := false
	heal := func(t *testing.T) {
		if !on {
			return
		}
		on = false
		for _, r := range rules {
			if err := iptables(t, "-D", r); err != nil {
				t.Error(err)
			}
		}
	}
	t.Cleanup(func() { heal(t) })
	return silencer{name: "packet loss " + packetLoss,
		silence: func(t *testing.T) {
			on = true
			for _, r := range rules {
				if err := iptables(t, "-A", r); err != nil {
					t.Fatal(err)
				}
			}
		},
		heal: heal}
}

// silencedSetup starts the proxy in front of a fresh database and returns the database's URL,
// the proxied URL and the proxy.
func silencedSetup(t *testing.T) (dbURL, proxied string, proxy *faultproxy.Proxy) {
	dbURL = pgtest.NewDB(t)
	proxy, err := faultproxy.New(pgtest.ProxyTarget(t, dbURL))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	return dbURL, pgtest.ThroughProxy(t, dbURL, proxy.Addr()), proxy
}

// TestFaultSilencedApplierMidMigration silences the path of the replica applying the slow lane
// in the middle of its long migration (through the proxy: blackholed, or iptables dropping its
// packets; or only the connection applying the lane, its heartbeat's connection flowing: then
// the applier's renewer ends its own stalled session). Another replica ends the silent
// session (or finds it ended) and finishes the lane; the long
// migration's work is committed once, by the replica that took over; once the path heals the
// old replica commits nothing and learns the lane is done.
func TestFaultSilencedApplierMidMigration(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"blackhole", "packet loss", "one connection"} {
		t.Run(strings.ReplaceAll(mode, " ", "_"), func(t *testing.T) {
			t.Parallel()
			serverSlots.reserve(t, 3)
			dbURL, proxied, proxy := silencedSetup(t)
			s := blackholeSilencer(proxy)
			switch mode {
			case "packet loss":
				s = packetLossSilencer(t, proxy)
			case "one connection":
				s = markedSilencer(proxy, "pg_sleep(0.05)")
			}
			silencedMidMigration(t, dbURL, proxied, s)
		})
	}
}

func silencedMidMigration(t *testing.T, dbURL, proxied string, s silencer) {
	dir := silenceLanes(t)
	key := lockKey(t, dbURL, dir, "slow")
	conn := pgtest.Connect(t, dbURL)
	old := startReplica(t, "old", proxied, dir)
	h := waitForHolder(t, conn, key, "pg_sleep")
	if h.app != old.appName() {
		t.Fatalf("the slow lane is applied by %q, want %s", h.app, old.appName())
	}
	rs := []*replica{startReplica(t, "t1", dbURL, dir), startReplica(t, "t2", dbURL, dir)}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" waiting for the slow lane", 90*time.Second, func() bool {
			k, ok := r.knows("slow")
			return ok && k.Role == "waiting"
		})
	}
	if cur, ok := lockHolder(t, conn, key); !ok || cur.pid != h.pid {
		t.Fatalf("the old replica's long migration ended before the silence (holder %+v); make it longer", cur)
	}
	s.silence(t)
	silenced := time.Now()
	hurryUp(t, conn)
	var states []string
	var took time.Duration
	var taker holder
	testkit.Eventually(t, "another replica takes the slow lane over", 3*time.Minute, func() bool {
		cur, ok := lockHolder(t, conn, key)
		if ok && cur.pid == h.pid && (len(states) == 0 || states[len(states)-1] != cur.state) {
			states = append(states, cur.state)
		}
		var found bool
		taker, took, found = takenOver(t, conn, key, h, silenced)
		return found
	})
	bound := silenceTakeoverBound
	if s.selfEnded {
		// The applier's renewer finds its session idle for the bound at its next tick.
		bound += silenceBound / 3
	}
	figure(t, "takeover_after_silence_"+strings.ReplaceAll(s.name, " ", "_"), took, bound)
	t.Logf("the silenced session was seen %v; %s took over", states, taker.app)
	testkit.Eventually(t, "the slow lane done", 3*time.Minute, func() bool {
		return pgtest.Scalar[int](t, conn, "select coalesce((select version from lanes_slow_version), 0)") == 3
	})
	figure(t, "lane_done_after_silence_"+strings.ReplaceAll(s.name, " ", "_"), time.Since(silenced), 0)
	if s.selfEnded {
		if !strings.Contains(old.log.String(), "connection applying the lane went silent") {
			t.Error("the old replica did not log that it ended its stalled session")
		}
	} else {
		var ender *replica
		for _, r := range rs {
			if strings.Contains(r.log.String(), "ended its session to take the lane over") {
				ender = r
			}
		}
		if ender == nil {
			t.Error("no replica logged that it ended the silent applier's session")
		}
	}

	s.heal(t)
	testkit.Eventually(t, "the old replica learns the slow lane is done", 3*time.Minute, func() bool {
		k, ok := old.knows("slow")
		return ok && k.Done
	})
	select {
	case err := <-old.done:
		t.Fatalf("the old replica exited after the path healed: %v", err)
	default:
	}
	runs := runsByVersion(t, conn)
	if !slices.Equal(runs[1], []string{old.appName()}) || !slices.Equal(runs[2], []string{taker.app}) || !slices.Equal(runs[3], []string{taker.app}) || len(runs) != 3 {
		t.Errorf("runs = %v; want version 1 once by %s, 2 and 3 once by %s", runs, old.appName(), taker.app)
	}
	checkHistoryExactlyOnce(t, conn, 4)
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where application_name = $1 and lane = 'slow' and version > 1", old.appName()); n != 0 {
		t.Errorf("the silenced replica recorded %d migrations after the silence", n)
	}
}

// TestFaultSilencedApplierMidBackfill silences the path of the replica walking a batched
// backfill: the other replica ends the silent session and resumes the walk after the last
// committed batch; every row is visited exactly once; the healed replica commits no batch after
// the silence.
func TestFaultSilencedApplierMidBackfill(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 2)
	dbURL, proxied, proxy := silencedSetup(t)
	dir := backfillLanes(t)
	conn := pgtest.Connect(t, dbURL)
	// A pause between batches long enough that the walk outlasts the other replica's start.
	env := []string{"LANES_BATCH_TARGET=50ms", "LANES_BATCH_PAUSE=300ms"}
	old := startReplica(t, "old", proxied, dir, env...)
	testkit.Eventually(t, "replica old ready", 90*time.Second, old.ready)
	testkit.Eventually(t, "the old replica walks the backfill", 3*time.Minute, func() bool { return walked(t, conn) > 0 })
	// The replica taking over walks without the long pause: the rest of the walk is not what
	// the test is about, and under load (two cores, load 77) it outlasted a 4 min guard.
	other := startReplica(t, "b", dbURL, dir, backfillEnv...)
	testkit.Eventually(t, "replica b waiting for the slow lane", 90*time.Second, func() bool {
		k, ok := other.knows("slow")
		return ok && k.Role == "waiting"
	})
	testkit.Eventually(t, "a quarter walked", 3*time.Minute, func() bool { return walked(t, conn) >= backfillRows/4 })
	proxy.SetBlackhole(true)
	silenced := time.Now()
	atSilence := walked(t, conn)
	if atSilence >= backfillRows {
		t.Fatalf("the walk finished before the silence (%d rows); make it longer", atSilence)
	}
	key := lockKey(t, dbURL, dir, "slow")
	testkit.Eventually(t, "replica b takes the slow lane over", 3*time.Minute, func() bool {
		h, ok := lockHolder(t, conn, key)
		return ok && h.app == other.appName()
	})
	figure(t, "takeover_after_silence_backfill", time.Since(silenced), silenceTakeoverBound)
	testkit.Eventually(t, "replica b finishes the lane", 4*time.Minute, func() bool {
		k, ok := other.knows("slow")
		return ok && k.Done
	})
	figure(t, "backfill_done_after_silence", time.Since(silenced), 0)
	if !strings.Contains(other.log.String(), "ended its session to take the lane over") {
		t.Error("replica b did not log that it ended the silent applier's session")
	}
	if !strings.Contains(other.log.String(), "resuming the batched migration after its last committed batch") {
		t.Error("replica b did not resume the walk")
	}
	done := walked(t, conn)
	proxy.SetBlackhole(false)
	testkit.Eventually(t, "the old replica learns the slow lane is done", 3*time.Minute, func() bool {
		k, ok := old.knows("slow")
		return ok && k.Done
	})
	if w := walked(t, conn); w != done {
		t.Errorf("the walk's progress moved from %d to %d after the healed replica came back", done, w)
	}
	checkVisitedOnce(t, conn)
	t.Logf("silenced at %d of %d rows committed", atSilence, backfillRows)
}

// TestFaultSilencedMigrateCommand silences the path of a one-shot `lanes migrate` in the middle
// of the long migration: a second `lanes migrate`, waiting for the lane, ends the silent session
// and applies the rest; the first, once its path heals, exits without having committed anything
// more.
func TestFaultSilencedMigrateCommand(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 2)
	dbURL, proxied, proxy := silencedSetup(t)
	dir := silenceLanes(t)
	key := lockKey(t, dbURL, dir, "slow")
	conn := pgtest.Connect(t, dbURL)
	first := startLanes(t, []string{"DATABASE_URL=" + proxied, "LANES_MIGRATIONS=" + dir, "PGAPPNAME=lanes-first"}, "migrate")
	h := waitForHolder(t, conn, key, "pg_sleep")
	if h.app != "lanes-first" {
		t.Fatalf("the slow lane is applied by %q", h.app)
	}
	second := startLanes(t, []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir, "PGAPPNAME=lanes-second"}, "migrate")
	proxy.SetBlackhole(true)
	silenced := time.Now()
	hurryUp(t, conn)
	if code, _ := second.wait(t, 3*time.Minute); code != 0 {
		t.Fatalf("the second lanes migrate exited with %d:\n%s", code, second.stderr.String())
	}
	figure(t, "migrate_done_after_silence", time.Since(silenced), silenceTakeoverBound)
	if !strings.Contains(second.stderr.String(), "ended its session to take the lane over") {
		t.Error("the second lanes migrate did not log that it ended the silent session")
	}
	proxy.SetBlackhole(false)
	code, _ := first.wait(t, 3*time.Minute)
	t.Logf("the silenced lanes migrate exited with %d once its path healed", code)
	runs := runsByVersion(t, conn)
	if !slices.Equal(runs[1], []string{"lanes-first"}) || !slices.Equal(runs[2], []string{"lanes-second"}) || !slices.Equal(runs[3], []string{"lanes-second"}) || len(runs) != 3 {
		t.Errorf("runs = %v; want version 1 by lanes-first, 2 and 3 once by lanes-second", runs)
	}
	checkHistoryExactlyOnce(t, conn, 4)
}
