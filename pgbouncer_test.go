package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
)

// pgbouncerBinary returns Debian's pgbouncer, or skips the test when it is missing (a failure
// when LANES_TEST_REQUIRE_DB=1: .ci/run installs it).
func pgbouncerBinary(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"pgbouncer", "/usr/sbin/pgbouncer"} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	if os.Getenv("LANES_TEST_REQUIRE_DB") == "1" {
		t.Fatal("pgbouncer is not installed (apt-get install pgbouncer); LANES_TEST_REQUIRE_DB=1 forbids skipping")
	}
	t.Skip("pgbouncer is not installed (apt-get install pgbouncer)")
	return ""
}

// freeLocalPort returns a TCP port on 127.0.0.1 that was free a moment ago. pgbouncer cannot
// listen on port 0 and say which port it got, so another process (the suite of another
// PostgreSQL version running beside this one) may take the port first: startPgBouncer then
// sees its pgbouncer exit and tries another.
func freeLocalPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// startPgBouncer starts a PgBouncer in front of the server of dbURL, with Debian's default
// settings apart from the database line, the listen address, trust authentication and
// pool_mode (session or transaction), and returns dbURL rewritten to go through it. It is
// stopped at the end of the test; its log is printed if the test failed.
func startPgBouncer(t *testing.T, dbURL, poolMode string) string {
	t.Helper()
	bin := pgbouncerBinary(t)
	cfg, err := pgconn.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil { // pgbouncer drops root for the postgres user
		t.Fatal(err)
	}
	host := cfg.Host
	if strings.HasPrefix(host, "/") {
		host = strings.TrimSuffix(host, "/")
	}
	if err := os.WriteFile(filepath.Join(dir, "userlist.txt"), fmt.Appendf(nil, "%q \"\"\n", cfg.User), 0o644); err != nil {
		t.Fatal(err)
	}
	var addr string
	for attempt := 1; ; attempt++ {
		port := freeLocalPort(t)
		addr = net.JoinHostPort("127.0.0.1", port)
		ini := fmt.Sprintf(`[databases]
* = host=%s port=%d

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %s
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = %s
`, host, cfg.Port, port, filepath.Join(dir, "userlist.txt"), poolMode)
		if err := os.WriteFile(filepath.Join(dir, "pgbouncer.ini"), []byte(ini), 0o644); err != nil {
			t.Fatal(err)
		}
		if listening, log := runPgBouncer(t, bin, dir, addr, poolMode); listening {
			break
		} else if attempt == 5 {
			t.Fatalf("pgbouncer exited at start 5 times; the last log:\n%s", log)
		} else {
			t.Logf("pgbouncer exited at start (port %s taken by another process?); trying another port:\n%s", port, log)
		}
	}
	u := url.URL{Scheme: "postgres", User: url.User(cfg.User), Host: addr, Path: "/" + cfg.Database, RawQuery: "sslmode=disable"}
	return u.String()
}

// runPgBouncer runs pgbouncer with dir's pgbouncer.ini until the end of the test and waits
// until it listens on addr. It returns false, with its log, when it exited first (its port
// was taken).
func runPgBouncer(t *testing.T, bin, dir, addr, poolMode string) (bool, string) {
	t.Helper()
	args := []string{filepath.Join(dir, "pgbouncer.ini")}
	if os.Geteuid() == 0 { // pgbouncer refuses to run as root
		u := "postgres"
		if _, err := user.Lookup(u); err != nil {
			t.Fatalf("running as root and there is no postgres user for pgbouncer: %v", err)
		}
		args = append([]string{"-u", u}, args...)
	}
	log := &logbuf.Buffer{}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("pgbouncer (%s mode, %s) log:\n%s", poolMode, addr, log.String())
		}
	})
	gone := func() bool {
		select {
		case <-exited:
			return true
		default:
			return false
		}
	}
	// Its own log says that it listens (a dial could reach another process's pgbouncer on a
	// port taken before ours bound it); it exits when it could not bind.
	var listening bool
	testkit.Eventually(t, "pgbouncer listens on "+addr+" or exits", time.Minute, func() bool {
		listening = strings.Contains(log.String(), "listening on "+addr)
		return listening || gone()
	})
	return listening, log.String()
}

// viaPgBouncer returns a function that starts a PgBouncer in poolMode in front of a database.
func viaPgBouncer(poolMode string) func(t *testing.T, dbURL string) string {
	return func(t *testing.T, dbURL string) string { return startPgBouncer(t, dbURL, poolMode) }
}

// TestPgBouncerSessionModeTakeoverAfterSigkill runs the SIGKILL takeover through Debian's
// PgBouncer in session mode with its default settings: the replicas connect (no startup
// parameter it refuses), apply every migration exactly once, and the dead-client check, set by
// a statement after connecting since PgBouncer refuses it as a startup parameter, frees the
// killed applier's lock within about a second (without it: when the killed statement ends).
func TestPgBouncerSessionModeTakeoverAfterSigkill(t *testing.T) {
	t.Parallel()
	takeoverAfterSigkill(t, viaPgBouncer("session"))
}

// poolerLanes returns a migrations folder exercising every kind of migration through a pooler:
// the fast lane creates the side-effect table runs (each migration inserts its lane, version and
// application_name, that is lanes-<replica>) and 2,000 items; the slow lane has a file that
// sleeps a second, a disable-tx CREATE INDEX CONCURRENTLY, and a batched backfill adding one to
// every item's n (every item ends at 1 when each batch committed exactly once).
func poolerLanes(t *testing.T) string {
	return testkit.WriteTree(t, map[string]string{
		"fast/001_runs.sql": `create table runs (lane text not null, version int not null, app text not null default current_setting('application_name'));
create table items (id int primary key, n int not null default 0);
insert into items (id) select g from generate_series(1, 2000) g;
insert into runs (lane, version) values ('fast', 1);`,
		"fast/002_second.sql": "insert into runs (lane, version) values ('fast', 2);",
		"slow/001_sleep.sql":  "insert into runs (lane, version) values ('slow', 1);\nselect pg_sleep(1);",
		"slow/002_index.sql": `---- tern: disable-tx ----
drop index concurrently if exists runs_version_idx;
create index concurrently runs_version_idx on runs (version);
insert into runs (lane, version) values ('slow', 2);`,
		"slow/003_backfill.sql": "---- lanes: batch table=items key=id size=100 ----\nupdate items set n = n + 1 where id > $1 and id <= $2;",
		"slow/004_last.sql":     "insert into runs (lane, version) values ('slow', 4);",
	})
}

// TestPgBouncerAppliesEveryLaneExactlyOnce starts three `lanes serve` replicas at once through
// Debian's PgBouncer with its default settings, in transaction and in session mode, each with
// and without LANES_DIRECT_URL: every migration (a plain file, a disable-tx concurrent index
// build, a batched backfill) is applied exactly once (one history row each, one side effect each,
// every item visited once, no failed attempt), every replica becomes ready and learns that the
// slow lane is done. Through a transaction pooler without a direct URL the lane locks are timed
// leases and the replicas poll (the deaf LISTEN is detected against the real pooler and said
// once in the log); with a direct URL they listen (a waiting replica learns from the
// notification). The time from the last slow commit to each waiting replica knowing it is
// logged as a FIGURE (BENCHMARKS.md).
func TestPgBouncerAppliesEveryLaneExactlyOnce(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"transaction", "session"} {
		for _, direct := range []bool{false, true} {
			name := mode
			if direct {
				name += "_direct"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				serverSlots.reserve(t, 4)
				dbURL := pgtest.NewDB(t)
				poolURL := startPgBouncer(t, dbURL, mode)
				dir := poolerLanes(t)
				var env []string
				if direct {
					env = append(env, "LANES_DIRECT_URL="+dbURL)
				}
				rs := make([]*replica, 3)
				var wg sync.WaitGroup
				for i := range rs {
					wg.Go(func() { rs[i] = startReplica(t, fmt.Sprintf("p%d", i+1), poolURL, dir, env...) })
				}
				wg.Wait()
				for _, r := range rs {
					testkit.Eventually(t, "replica "+r.name+" learns the slow lane is done", 3*time.Minute, func() bool {
						k, ok := r.knows("slow")
						return ok && k.Done && r.ready()
					})
				}
				conn := pgtest.Connect(t, dbURL)
				checkHistoryExactlyOnce(t, conn, 6)
				if n := pgtest.Scalar[int](t, conn, "select count(*) from (select lane, version from runs group by 1, 2 having count(*) = 1) r"); n != 5 {
					t.Errorf("%d migrations left their side effect exactly once, want 5 (runs: %v)", n, pgtest.Scalar[string](t, conn, "select string_agg(lane || version || ':' || app, ', ') from runs"))
				}
				if n := pgtest.Scalar[int](t, conn, "select count(*) from items where n <> 1"); n != 0 {
					t.Errorf("%d items not visited exactly once by the backfill", n)
				}
				if !pgtest.Scalar[bool](t, conn, "select indisvalid from pg_index where indexrelid = 'runs_version_idx'::regclass") {
					t.Error("the concurrent index is not valid")
				}
				for lane, want := range map[string]int{"fast": 2, "slow": 4} {
					if v := pgtest.Scalar[int](t, conn, "select version from lanes_"+lane+"_version"); v != want {
						t.Errorf("lane %s at version %d, want %d", lane, v, want)
					}
				}
				last := pgtest.Scalar[time.Time](t, conn, "select finished_at from lanes_history where lane = 'slow' and version = 4")
				applier := pgtest.Scalar[string](t, conn, "select application_name from lanes_history where lane = 'slow' and version = 4")
				// The replicas that waited learned the completion from a notification, or, through
				// a transaction pooler without a direct URL, from a poll.
				wantVia := "notification"
				if mode == "transaction" && !direct {
					wantVia = "poll"
				}
				for _, r := range rs {
					k, _ := r.knows("slow")
					if r.appName() != applier {
						switch {
						case k.Via == wantVia:
						case wantVia == "notification" && k.Via == "check":
							// The successor's lock check (every second) may find the lock free
							// between the applier's commit and the notification's arrival: the
							// notification must still reach the replica.
							testkit.Eventually(t, "replica "+r.name+" receives the completion's notification", time.Minute, func() bool {
								v, ok := r.view()
								n := v.LastNotification
								return ok && n != nil && n.Lane == "slow" && n.Version == 4 && n.Kind == "done"
							})
						default:
							t.Errorf("replica %s learned the slow lane was done by %q, want %q", r.name, k.Via, wantVia)
						}
						if k.DoneAt != nil {
							figure(t, "pgbouncer_"+name+"_completion_latency", k.DoneAt.Sub(last), 0)
						}
					}
					if n := strings.Count(r.log.String(), "polling instead"); mode == "transaction" && !direct && n != 1 {
						t.Errorf("replica %s said %d times that it polls, want once", r.name, n)
					}
					if n := strings.Count(r.log.String(), "pooler in transaction mode"); (mode == "transaction") != (n == 1) {
						t.Errorf("replica %s said %d times that it goes through a transaction pooler", r.name, n)
					}
				}
				// The commands work through the pooler too.
				cmdEnv := append([]string{"DATABASE_URL=" + poolURL, "LANES_MIGRATIONS=" + dir}, env...)
				for _, args := range [][]string{{"migrate"}, {"status"}, {"history", "--lane", "slow"}, {"force", "--lane", "slow", "--version", "4"}} {
					if res := runLanes(t, cmdEnv, args...); res.code != 0 {
						t.Errorf("lanes %s through the %s pooler: %v", args[0], mode, res)
					}
				}
			})
		}
	}
}

// TestPgBouncerTransactionModeDirectTakeoverAfterSigkill: through a transaction pooler with
// LANES_DIRECT_URL, the lane lock is the session lock on the direct connection, and a SIGKILLed
// applier is taken over within the same bound as on a direct connection.
func TestPgBouncerTransactionModeDirectTakeoverAfterSigkill(t *testing.T) {
	t.Parallel()
	takeoverAfterSigkillEnv(t, viaPgBouncer("transaction"), true)
}

// leaseTTL is migrator.Config.LeaseTTL's default: a timed lease (through a transaction pooler
// without a direct URL) not renewed for this long may be taken over.
const leaseTTL = 3 * time.Second

// pollInterval is notifier.Config.PollInterval's default: behind a transaction pooler without a
// direct URL the replicas re-read the lanes this often (LISTEN hears nothing there).
const pollInterval = 5 * time.Second

// leaseHolder returns the application name in the holder of the lane's live timed lease, its
// epoch, and whether there is one.
func leaseHolder(t *testing.T, conn *pgx.Conn, lane string) (app string, epoch int64, ok bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	err := conn.QueryRow(ctx, `select substring(holder from '[(](.*)[)]$'), epoch from lanes_lease
where lane = $1 and session_pid is null and expires_at > clock_timestamp()`, lane).Scan(&app, &epoch)
	if errors.Is(err, pgx.ErrNoRows) || isUndefinedTable(err) {
		return "", 0, false
	}
	if err != nil {
		t.Fatalf("read the lease of lane %s: %v", lane, err)
	}
	return app, epoch, true
}

func isUndefinedTable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42P01"
}

// TestPgBouncerTransactionModeTakeoverAfterSigkill: through Debian's PgBouncer in transaction
// mode, without a direct URL, the replicas hold lanes with timed leases. The applier is
// SIGKILLed in the middle of a long migration: its lease expires within LeaseTTL, another
// replica takes the lane over at its next poll, the killed migration's transaction is rolled
// back (PgBouncer closes the server connection, which the server notices within the
// transaction's client_connection_check_interval), and every migration is applied exactly once.
func TestPgBouncerTransactionModeTakeoverAfterSigkill(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 3)
	dbURL := pgtest.NewDB(t)
	poolURL := startPgBouncer(t, dbURL, "transaction")
	dir := runsLanes(t)
	conn := pgtest.Connect(t, dbURL)
	rs := map[string]*replica{}
	for _, name := range []string{"k1", "k2", "k3"} {
		rs["lanes-"+name] = startReplica(t, name, poolURL, dir)
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" ready", 60*time.Second, r.ready)
	}
	var victimApp string
	var epoch int64
	testkit.Eventually(t, "a replica holds the slow lane's lease and runs the long migration", 90*time.Second, func() bool {
		app, e, ok := leaseHolder(t, conn, "slow")
		if !ok {
			return false
		}
		victimApp, epoch = app, e
		return pgtest.Scalar[int](t, conn, "select count(*) from pg_stat_activity where datname = current_database() and application_name = $1 and state = 'active' and query like '%pg_sleep%'", app) == 1
	})
	victim := rs[victimApp]
	if victim == nil {
		t.Fatalf("the slow lane's lease is held by %q, not by a replica", victimApp)
	}
	victim.kill(t)
	killed := time.Now()
	hurryUp(t, conn)
	bound := leaseTTL + pollInterval + slack
	var took time.Duration
	var taker string
	testkit.Eventually(t, "another replica takes the slow lane over", bound+slack, func() bool {
		app, e, ok := leaseHolder(t, conn, "slow")
		if ok && e > epoch && app != victimApp {
			taker, took = app, time.Since(killed)
			return true
		}
		return false
	})
	figure(t, "pgbouncer_transaction_takeover_after_sigkill", took, bound)
	if took > bound {
		t.Errorf("takeover after %s, want within %s", took, bound)
	}
	if rs[taker] == nil {
		t.Fatalf("the lease went to %q", taker)
	}
	for app, r := range rs {
		if app == victimApp {
			continue
		}
		testkit.Eventually(t, "replica "+r.name+" learns the slow lane is done", 2*time.Minute, func() bool {
			k, ok := r.knows("slow")
			return ok && k.Done
		})
	}
	runs := runsByVersion(t, conn)
	// Version 1 is durable before the kill, applied once by whichever replica held the lease
	// then (under load a lease may expire between two migrations and pass to another replica,
	// which is fine: the epoch fences the one that lost it).
	if len(runs[1]) != 1 || rs[runs[1][0]] == nil || !slices.Equal(runs[2], []string{taker}) || !slices.Equal(runs[3], []string{taker}) || len(runs) != 3 {
		t.Errorf("runs = %v; want version 1 once by a replica (durable before the kill), 2 and 3 once by %s", runs, taker)
	}
	checkHistoryExactlyOnce(t, conn, 4)
}
