package migrator_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/tern/v2/migrate"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/session"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

func TestMain(m *testing.M) {
	if url := os.Getenv(nestedHelperEnv); url != "" {
		runNestedHelper(url) // a helper process of a fault test; never returns
	}
	pgtest.RunMain(m)
}

// setup returns a fresh database's connection config and an admin connection to it.
func setup(t *testing.T) (*pgx.ConnConfig, *pgx.Conn) {
	t.Helper()
	url := pgtest.NewDB(t)
	cc, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return cc, conn
}

func newMigrator(t *testing.T, cc *pgx.ConnConfig, lanes ...migrator.Lane) *migrator.Migrator {
	t.Helper()
	m, err := migrator.New(cc, lanes, migrator.Config{LockPollInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// ctxT is a test's context: a guard against a hang, not a bound on how fast the machine is (a
// 30 s guard ended TestBatchedResumesAfterInterruption's 9,000-row walk on a loaded machine).
func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

var twoFiles = fstest.MapFS{
	"001_create.sql": testkit.File("create table a (i int);\n---- create above / drop below ----\ndrop table a;"),
	"002_insert.sql": testkit.File("insert into a values (1), (2);"),
}

func TestMigrateIsTernCompatible(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	m := newMigrator(t, cc, migrator.Lane{Name: "fast", FS: twoFiles})
	res, err := m.Migrate(ctx, "fast")
	if err != nil {
		t.Fatal(err)
	}
	if res.From != 0 || res.To != 2 || res.Applied != 2 || res.Ahead {
		t.Fatalf("result = %+v", res)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from a"); n != 2 {
		t.Fatalf("rows = %d", n)
	}
	// The stock tern Migrator, pointed at the same files and version table, sees the same state
	// and has nothing to do.
	tm, err := migrate.NewMigrator(ctx, conn, "lanes_fast_version")
	if err != nil {
		t.Fatal(err)
	}
	if err := tm.LoadMigrations(twoFiles); err != nil {
		t.Fatal(err)
	}
	if v, err := tm.GetCurrentVersion(ctx); err != nil || v != 2 {
		t.Fatalf("tern reads version %d, %v", v, err)
	}
	if err := tm.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from a"); n != 2 {
		t.Fatalf("tern re-applied migrations: rows = %d", n)
	}
	// Running again applies nothing.
	if res, err = m.Migrate(ctx, "fast"); err != nil || res.Applied != 0 || res.To != 2 {
		t.Fatalf("second run = %+v, %v", res, err)
	}
	// History: one row per applied migration, with the checksum of what ran.
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where lane = 'fast' and error is null and host <> '' and pid > 0 and application_name like 'lanes/%' and length(checksum) = 64"); n != 2 {
		t.Fatalf("history rows = %d", n)
	}
}

func TestUpToDateLaneTakesNoLock(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	m := newMigrator(t, cc, migrator.Lane{Name: "fast", FS: twoFiles})
	if _, err := m.Migrate(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	key, _ := m.LockKey(ctx, conn, "fast")
	if _, err := conn.Exec(ctx, "select pg_advisory_lock($1)", key); err != nil {
		t.Fatal(err)
	}
	// With the lane's lock held elsewhere, an up-to-date lane returns without waiting: TryMigrate
	// would report ErrLocked if it had tried the lock.
	if res, err := m.TryMigrate(ctx, "fast"); err != nil || res.To != 2 {
		t.Fatalf("TryMigrate on an up-to-date lane = %+v, %v", res, err)
	}
}

func TestLanesHaveSeparateLocks(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	m := newMigrator(t, cc,
		migrator.Lane{Name: "fast", FS: twoFiles},
		migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"001_b.sql": testkit.File("create table b (i int);")}})
	slowKey, _ := m.LockKey(ctx, conn, "slow")
	// Another session holds the slow lane's lock and tern's own constant lock.
	if _, err := conn.Exec(ctx, "select pg_advisory_lock($1), pg_advisory_lock(9628173550095224)", slowKey); err != nil {
		t.Fatal(err)
	}
	if _, err := m.TryMigrate(ctx, "fast"); err != nil {
		t.Fatalf("fast lane blocked by the slow lane's or tern's lock: %v", err)
	}
	if _, err := m.TryMigrate(ctx, "slow"); !errors.Is(err, migrator.ErrLocked) {
		t.Fatalf("slow lane: err = %v, want ErrLocked", err)
	}
	st, err := m.Status(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	if st[0].State != migrator.StateDone || st[1].State != migrator.StateRunning || !st[1].Locked {
		t.Fatalf("status = %+v", st)
	}
	if _, err := conn.Exec(ctx, "select pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.TryMigrate(ctx, "slow"); err != nil {
		t.Fatal(err)
	}
}

func TestMigrateWaitsForHolderAndAppliesExactlyOnce(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	var runs atomic.Int32
	release := make(chan struct{})
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"002_after.sql": testkit.File("insert into work values (2);")},
		Funcs: []migrator.GoMigration{{Version: 1, Name: "work", Up: func(ctx context.Context, c pgx.Tx) error {
			runs.Add(1)
			<-release
			_, err := c.Exec(ctx, "create table work (i int); insert into work values (1)")
			return err
		}}}}
	const replicas = 5
	// The replicas' connections report the lock attempts that end while the holder runs.
	var mu sync.Mutex
	waiting := map[*pgx.Conn]bool{}
	cc = cc.Copy()
	cc.Tracer = lockTries(func(c *pgx.Conn) {
		if runs.Load() > 0 {
			mu.Lock()
			defer mu.Unlock()
			waiting[c] = true
		}
	})
	var wg sync.WaitGroup
	results := make([]migrator.Result, replicas)
	errs := make([]error, replicas)
	for i := range replicas {
		m := newMigrator(t, cc, lane) // one Migrator per replica
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = m.Migrate(ctx, "slow")
		}()
	}
	// Every other replica tries the lock, and finds it held, before the holder finishes.
	testkit.Eventually(t, "every waiting replica tried the held lock", time.Minute, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(waiting) >= replicas-1
	})
	close(release)
	wg.Wait()
	applied := 0
	for i := range replicas {
		if errs[i] != nil {
			t.Fatalf("replica %d: %v", i, errs[i])
		}
		if results[i].To != 2 {
			t.Fatalf("replica %d result %+v", i, results[i])
		}
		applied += results[i].Applied
	}
	if runs.Load() != 1 || applied != 2 {
		t.Fatalf("go migration ran %d times, %d migrations applied in all; want 1 and 2", runs.Load(), applied)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from work"); n != 2 {
		t.Fatalf("rows = %d", n)
	}
}

func TestAheadOfBinaryIsDone(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	newer := fstest.MapFS{"001_create.sql": twoFiles["001_create.sql"], "002_insert.sql": twoFiles["002_insert.sql"], "003_more.sql": testkit.File("insert into a values (3);")}
	if _, err := newMigrator(t, cc, migrator.Lane{Name: "fast", FS: newer}).Migrate(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	older := newMigrator(t, cc, migrator.Lane{Name: "fast", FS: twoFiles})
	res, err := older.Migrate(ctx, "fast")
	if err != nil || !res.Ahead || res.To != 3 || res.Applied != 0 {
		t.Fatalf("older binary: %+v, %v", res, err)
	}
	st, err := older.Status(ctx, conn)
	if err != nil || st[0].State != migrator.StateAhead || !st[0].Done() {
		t.Fatalf("status = %+v, %v", st, err)
	}
}

func TestFailedMigrationRollsBackAndIsReported(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{
		"001_ok.sql":  testkit.File("create table ok (i int);"),
		"002_bad.sql": testkit.File("-- a comment\ncreate table half (i int);\n\ninsert into half\n  select * from missing_table;\n"),
	}}
	m := newMigrator(t, cc, lane)
	if _, err := conn.Exec(ctx, "listen lanes_done"); err != nil {
		t.Fatal(err)
	}
	res, err := m.Migrate(ctx, "slow")
	var me *migrator.MigrationError
	if !errors.As(err, &me) {
		t.Fatalf("err = %v, want *MigrationError", err)
	}
	if me.Lane != "slow" || me.File != "002_bad.sql" || me.Version != 2 || me.SQLState != "42P01" || me.Line != 5 ||
		!strings.HasPrefix(me.Statement, "insert into half") || me.Transient() {
		t.Fatalf("error = %#v", me)
	}
	for _, want := range []string{`lane "slow"`, "002_bad.sql", "line 5", "missing_table", "42P01"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if res.To != 1 || res.Applied != 1 {
		t.Fatalf("result = %+v", res)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_tables where tablename = 'half'"); n != 0 {
		t.Fatal("the failed migration's first statement was left applied")
	}
	if n := pgtest.Scalar[int](t, conn, "select version from lanes_slow_version"); n != 1 {
		t.Fatalf("version = %d", n)
	}
	st, err := m.Status(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	if st[0].State != migrator.StateFailed || !strings.Contains(st[0].Error, "missing_table") || st[0].Failure == nil ||
		st[0].Failure.File != "002_bad.sql" || st[0].Failure.SQLState != "42P01" || st[0].Failure.Transient {
		t.Fatalf("status = %+v %+v", st[0], st[0].Failure)
	}
	// Listeners heard the successful first migration and then the failure.
	var events []wire.Event
	for len(events) < 2 {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		if err != nil {
			t.Fatalf("after %d events: %v", len(events), err)
		}
		ev, err := wire.Parse(n.Payload)
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, ev)
	}
	if events[0] != (wire.Event{Lane: "slow", Version: 1, State: wire.Applied, File: "001_ok.sql"}) ||
		events[1] != (wire.Event{Lane: "slow", Version: 2, State: wire.Failed, File: "002_bad.sql"}) {
		t.Fatalf("events = %+v", events)
	}
	// A fixed file continues from version 1.
	lane.FS = fstest.MapFS{"001_ok.sql": lane.FS.(fstest.MapFS)["001_ok.sql"], "002_bad.sql": testkit.File("create table half (i int);")}
	if res, err := newMigrator(t, cc, lane).Migrate(ctx, "slow"); err != nil || res.From != 1 || res.To != 2 {
		t.Fatalf("fixed deploy: %+v, %v", res, err)
	}
	if st, _ := m.Status(ctx, conn); st[0].State != migrator.StateDone || st[0].Error != "" {
		t.Fatalf("status after fix = %+v", st[0])
	}
}

func TestCompletionNotifiesInTheSameTransaction(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	m := newMigrator(t, cc, migrator.Lane{Name: "fast", FS: twoFiles})
	if _, err := conn.Exec(ctx, "listen lanes_done"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Migrate(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	n, err := conn.WaitForNotification(wctx)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := wire.Parse(n.Payload)
	if err != nil || ev != (wire.Event{Lane: "fast", Version: 2, State: wire.Done, File: "002_insert.sql"}) {
		t.Fatalf("event = %+v, %v (payload %s)", ev, err, n.Payload)
	}
	// A blocking lane notifies only at its end: no second notification is pending.
	wctx2, cancel2 := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel2()
	if n, err := conn.WaitForNotification(wctx2); err == nil {
		t.Fatalf("unexpected notification %s", n.Payload)
	}
}

func TestDisableTxAndGoMigrations(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{
		"001_t.sql":   testkit.File("create table t (i int);"),
		"003_idx.sql": testkit.File("---- tern: disable-tx ----\ndrop index concurrently if exists t_i;\ncreate index concurrently t_i on t (i);"),
	}, Funcs: []migrator.GoMigration{{Version: 2, Name: "fill", Up: func(ctx context.Context, c pgx.Tx) error {
		_, err := c.Exec(ctx, "insert into t select generate_series(1, 100)")
		return err
	}}}}
	if _, err := newMigrator(t, cc, lane).Migrate(ctx, "slow"); err != nil {
		t.Fatal(err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_index where indexrelid = 't_i'::regclass and indisvalid"); n != 1 {
		t.Fatal("concurrent index missing or invalid")
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from t"); n != 100 {
		t.Fatalf("rows = %d", n)
	}
}

func TestGoMigrationErrorRollsBack(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{{Version: 1, Name: "half", Up: func(ctx context.Context, c pgx.Tx) error {
		if _, err := c.Exec(ctx, "create table half (i int)"); err != nil {
			return err
		}
		return errors.New("gave up halfway")
	}}}}
	_, err := newMigrator(t, cc, lane).Migrate(ctx, "slow")
	var me *migrator.MigrationError
	if !errors.As(err, &me) || me.File != "001_half.go" || !strings.Contains(err.Error(), "gave up halfway") {
		t.Fatalf("err = %v", err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_tables where tablename = 'half'"); n != 0 {
		t.Fatal("go migration's work was not rolled back")
	}
}

func TestCancelRollsBackAndReleasesLock(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	started := make(chan struct{})
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{{Version: 1, Name: "long", Up: func(ctx context.Context, c pgx.Tx) error {
		if _, err := c.Exec(ctx, "create table long_t (i int)"); err != nil {
			return err
		}
		close(started)
		_, err := c.Exec(ctx, "select pg_sleep(60)")
		return err
	}}}}
	m := newMigrator(t, cc, lane)
	mctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { _, err := m.Migrate(mctx, "slow"); done <- err }()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("migration did not start")
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Logf("err = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Migrate did not return after cancel")
	}
	// Cancellation asks the server to cancel the statement; if that request races with the start
	// of a statement, pgx breaks the connection after 5 s instead, and the server then ends the
	// session (and its lock) within client_connection_check_interval. Either way the lock is
	// released and the transaction rolled back, within a bounded time.
	key, _ := m.LockKey(ctx, conn, "slow")
	deadline := time.Now().Add(10 * time.Second)
	for {
		var free bool
		if err := conn.QueryRow(ctx, "select pg_try_advisory_lock($1)", key).Scan(&free); err != nil {
			t.Fatal(err)
		}
		if free {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("lane lock still held 10 s after cancel")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_tables where tablename = 'long_t'"); n != 0 {
		t.Fatal("cancelled migration left its table")
	}
}

func TestDriftIsReportedAndStopsMigrate(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	if _, err := newMigrator(t, cc, migrator.Lane{Name: "fast", FS: twoFiles}).Migrate(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	edited := fstest.MapFS{
		"001_create.sql": testkit.File("create table a (i int, j int);"), // changed after it was applied
		"002_insert.sql": twoFiles["002_insert.sql"],
		"003_more.sql":   testkit.File("insert into a values (3);"),
	}
	m := newMigrator(t, cc, migrator.Lane{Name: "fast", FS: edited})
	st, err := m.Status(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.AddDrift(ctx, conn, st); err != nil || len(st[0].Drift) != 1 || st[0].Drift[0] != "001_create.sql" {
		t.Fatalf("drift = %v, %v", st[0].Drift, err)
	}
	_, err = m.Migrate(ctx, "fast")
	var de *migrator.DriftError
	if !errors.As(err, &de) || de.Lane != "fast" || len(de.Files) != 1 || !strings.Contains(err.Error(), "001_create.sql") {
		t.Fatalf("Migrate = %v, want a *DriftError naming 001_create.sql", err)
	}
	if n := pgtest.Scalar[int](t, conn, "select version from lanes_fast_version"); n != 2 {
		t.Fatalf("version = %d: Migrate applied past drift", n)
	}
	allow, err := migrator.New(cc, []migrator.Lane{{Name: "fast", FS: edited}}, migrator.Config{AllowDrift: true})
	if err != nil {
		t.Fatal(err)
	}
	if res, err := allow.Migrate(ctx, "fast"); err != nil || res.To != 3 {
		t.Fatalf("with AllowDrift: %+v, %v", res, err)
	}
}

// Every connection a Migrator makes carries application_name lanes/<host>/<pid> as its only
// added startup parameter (older servers and PgBouncer refuse the others at startup: PostgreSQL
// 13 refuses client_connection_check_interval with 42704); the session settings are set after
// connecting, as far as the server has them, and set again after each migration's reset all.
func TestDedicatedConnectionSettings(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	var logs bytes.Buffer
	m, err := migrator.New(cc, []migrator.Lane{{Name: "fast", FS: twoFiles}}, migrator.Config{Logger: zerolog.New(&logs)})
	if err != nil {
		t.Fatal(err)
	}
	version := pgtest.Scalar[int](t, conn, "select current_setting('server_version_num')::int")
	check := func(what string, mc *pgx.Conn) {
		t.Helper()
		var app string
		var fromClient []string
		var tcp bool
		if err := mc.QueryRow(ctx, `select current_setting('application_name'),
  coalesce((select array_agg(name::text order by name) from pg_settings where source = 'client'), '{}'), inet_client_addr() is not null`).Scan(&app, &fromClient, &tcp); err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("lanes/%s/%d", hostname(t), os.Getpid()); app != want {
			t.Fatalf("%s: application_name %q, want %q", what, app, want)
		}
		for _, name := range fromClient {
			if name != "application_name" && name != "client_encoding" && name != "DateStyle" {
				t.Fatalf("%s: startup packet carried %s (startup parameters: %v)", what, name, fromClient)
			}
		}
		settings := map[string]string{}
		rows, err := mc.Query(ctx, "select name, setting from pg_settings where name in ('client_connection_check_interval', 'tcp_keepalives_idle', 'tcp_keepalives_interval', 'tcp_keepalives_count')")
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var n, v string
			if err := rows.Scan(&n, &v); err != nil {
				t.Fatal(err)
			}
			settings[n] = v
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		if version >= session.DeadClientCheckVersion && settings["client_connection_check_interval"] != "1000" {
			t.Fatalf("%s: client_connection_check_interval = %q on server %d, want 1000", what, settings["client_connection_check_interval"], version)
		}
		if tcp && (settings["tcp_keepalives_idle"] != "10" || settings["tcp_keepalives_interval"] != "5" || settings["tcp_keepalives_count"] != "3") {
			t.Fatalf("%s: keepalives over TCP = %v, want 10/5/3", what, settings)
		}
	}
	mc, err := engine.Connect(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	defer mc.Close(ctx)
	check("after connect", mc)
	// A migration's reset all must not drop the settings for the rest of the run: the session
	// that applied the migrations still has them.
	if _, err := m.TryMigrate(engine.WithConn(ctx, mc), "fast"); err != nil {
		t.Fatal(err)
	}
	check("after migrating", mc)
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where application_name = $1", fmt.Sprintf("lanes/%s/%d", hostname(t), os.Getpid())); n != 2 {
		t.Fatalf("history rows with the default application_name = %d, want 2", n)
	}
	said := strings.Count(logs.String(), "no client_connection_check_interval")
	if version < session.DeadClientCheckVersion && said != 1 {
		t.Fatalf("server %d: the missing dead-client check was said %d times, want once:\n%s", version, said, logs.String())
	}
	if version >= session.DeadClientCheckVersion && said != 0 {
		t.Fatalf("server %d has the dead-client check, log says otherwise:\n%s", version, logs.String())
	}
}

// A setting given in the connection configuration is the user's: sent as they asked, never
// overridden after connecting; an application_name they set is kept.
func TestConnectionSettingsKeepTheUsers(t *testing.T) {
	t.Parallel()
	cc, _ := setup(t)
	ctx := ctxT(t)
	cc = cc.Copy()
	cc.RuntimeParams = map[string]string{"application_name": "mine", "tcp_keepalives_count": "7"}
	m := newMigrator(t, cc, migrator.Lane{Name: "fast", FS: twoFiles})
	mc, err := engine.Connect(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	defer mc.Close(ctx)
	var app, count string
	if err := mc.QueryRow(ctx, "select current_setting('application_name'), (select source from pg_settings where name = 'tcp_keepalives_count')").Scan(&app, &count); err != nil {
		t.Fatal(err)
	}
	if app != "mine" || count != "client" {
		t.Fatalf("application_name %q, tcp_keepalives_count from %q; want mine, client", app, count)
	}
}

func hostname(t *testing.T) string {
	t.Helper()
	h, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// A transactional file runs as one query, as tern runs it: SQL a statement splitter could
// misread (a BEGIN ATOMIC body, a rule with several actions) applies as written.
func TestFileRunsAsOneQueryLikeTern(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	body := "begin atomic\n  select 1;\n  select 2;\nend;"
	if pgtest.Scalar[int](t, conn, "select current_setting('server_version_num')::int") < 140000 {
		body = "as 'select 1; select 2';" // PostgreSQL 13 has no BEGIN ATOMIC; the rule below still applies
	}
	lane := migrator.Lane{Name: "fast", FS: fstest.MapFS{
		"001_atomic.sql": testkit.File("create table log (i int);\ncreate function two() returns int language sql\n" + body + "\ncreate table audit (i int);\ncreate rule twice as on insert to log where new.i = 0 do also (insert into audit values (-1); insert into audit values (-2));"),
		"002_use.sql":    testkit.File("insert into log values (two()), (0);"),
	}}
	if _, err := newMigrator(t, cc, lane).Migrate(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from log") + pgtest.Scalar[int](t, conn, "select count(*) from audit"); n != 4 {
		t.Fatalf("log and audit have %d rows, want 4", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select sum(i) from log"); n != 2 {
		t.Fatalf("sum(log) = %d, want 2: two() must return 2", n)
	}
}

// An error without a position (a constraint violation) is still attributed to its statement,
// located by counting the statements the server completed, and nothing is left behind.
func TestErrorWithoutPositionNamesTheStatement(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	lane := migrator.Lane{Name: "fast", FS: fstest.MapFS{
		"001_dup.sql": testkit.File("create table u (i int primary key);\ninsert into u values (1);\n\ninsert into u values (2),\n  (1);\ninsert into u values (3);"),
	}}
	_, err := newMigrator(t, cc, lane).Migrate(ctx, "fast")
	var me *migrator.MigrationError
	if !errors.As(err, &me) || me.SQLState != "23505" || me.Line != 4 || !strings.HasPrefix(me.Statement, "insert into u values (2)") {
		t.Fatalf("err = %v (%#v)", err, me)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_tables where tablename = 'u'"); n != 0 {
		t.Fatal("the failed migration left the table")
	}
}

// Two lanes whose version tables are one table ("t" and "public.t") are refused before anything
// runs: nothing is created, and the error names both lanes.
func TestLanesSharingAVersionTableAreRefused(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	m := newMigrator(t, cc,
		migrator.Lane{Name: "fast", VersionTable: "shared_version", FS: twoFiles},
		migrator.Lane{Name: "slow", Mode: migrator.Background, VersionTable: "public.shared_version", FS: fstest.MapFS{"001_b.sql": testkit.File("create table b (i int);")}})
	for _, lane := range []string{"fast", "slow"} {
		_, err := m.Migrate(ctx, lane)
		if err == nil || !strings.Contains(err.Error(), `"fast"`) || !strings.Contains(err.Error(), `"slow"`) || !strings.Contains(err.Error(), "public.shared_version") {
			t.Fatalf("Migrate(%s) = %v, want an error naming both lanes and the table", lane, err)
		}
	}
	if _, err := m.Status(ctx, conn); err == nil {
		t.Fatal("Status accepted two lanes sharing a version table")
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_class where relname in ('shared_version', 'a', 'b', 'lanes_history')"); n != 0 {
		t.Fatalf("%d tables created although the lanes were refused", n)
	}
}

// A dropped version table is not version 0 while the history records the lane's migrations as
// applied: Migrate refuses, naming both tables, and applies nothing again.
func TestMissingVersionTableWithHistoryIsRefused(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	m := newMigrator(t, cc, migrator.Lane{Name: "fast", FS: twoFiles})
	if _, err := m.Migrate(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "drop table lanes_fast_version; drop table a"); err != nil {
		t.Fatal(err)
	}
	_, err := m.Migrate(ctx, "fast")
	if err == nil || !strings.Contains(err.Error(), "lanes_fast_version") || !strings.Contains(err.Error(), "lanes_history") {
		t.Fatalf("err = %v, want a refusal naming both tables", err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_class where relname in ('lanes_fast_version', 'a')"); n != 0 {
		t.Fatal("migration 1 was applied again")
	}
	// Status names the qualified version table.
	st, err := m.Status(ctx, conn)
	if err != nil || st[0].VersionTable != "public.lanes_fast_version" {
		t.Fatalf("status = %+v, %v", st, err)
	}
}

// Locating a failed statement executes nothing again: a sequence the file advances before the
// failing statement advances once, and a statement cancelled by statement_timeout (an error
// without a position) is named without running it again. Before, the statements were replayed
// in a rolled-back transaction: nextval ran twice, and so did pg_sleep.
func TestLocatingAFailureRunsNothingAgain(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	if _, err := conn.Exec(ctx, "create sequence s; create sequence calls; create table u (i int primary key)"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		file, sql, sqlstate, statement string
		line                           int
	}{
		{"001_dup.sql", "select nextval('s');\ninsert into u values (1);\ninsert into u values (1);", "23505", "insert into u values (1);", 3},
		{"001_slow.sql", "set local statement_timeout = '200ms';\nselect 1;\nselect nextval('calls'), pg_sleep(5);\nselect 2;", "57014", "select nextval('calls'), pg_sleep(5);", 3},
	} {
		lane := migrator.Lane{Name: "fast", FS: fstest.MapFS{tc.file: testkit.File(tc.sql)}}
		_, err := newMigrator(t, cc, lane).Migrate(ctx, "fast")
		var me *migrator.MigrationError
		if !errors.As(err, &me) || me.SQLState != tc.sqlstate || me.Statement != tc.statement || me.Line != tc.line || me.File != tc.file {
			t.Fatalf("%s: err = %v (%#v), want %s at line %d: %s", tc.file, err, me, tc.sqlstate, tc.line, tc.statement)
		}
	}
	for _, seq := range []string{"s", "calls"} {
		if n := pgtest.Scalar[int](t, conn, "select case when is_called then last_value else 0 end from "+seq); n != 1 {
			t.Errorf("sequence %s advanced %d times, want once: a statement ran again", seq, n)
		}
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from u"); n != 0 {
		t.Fatalf("u has %d rows after the failed migration", n)
	}
}

// When the statements the server completed do not map onto the file's statements (here the
// splitter, like psql, takes a BEGIN in a CREATE FUNCTION for a body and sees one statement
// where the server runs two), the error says the statement could not be located and names
// none, rather than a wrong one.
func TestUnlocatableFailureNamesNoStatement(t *testing.T) {
	t.Parallel()
	cc, _ := setup(t)
	ctx := ctxT(t)
	lane := migrator.Lane{Name: "fast", FS: fstest.MapFS{
		"001_odd.sql": testkit.File("create function odd() returns int language sql set search_path = begin as 'select 1';\nselect 1/0;"),
	}}
	_, err := newMigrator(t, cc, lane).Migrate(ctx, "fast")
	var me *migrator.MigrationError
	if !errors.As(err, &me) || !errors.Is(err, migrator.ErrNotLocated) || me.Statement != "" || me.SQLState != "22012" {
		t.Fatalf("err = %v (%#v), want ErrNotLocated, no statement, SQLSTATE 22012", err, me)
	}
}

// An applier holds both the lane's lock key and its applier lock key (the key of the version
// table's name as configured, the only key of earlier releases), so a replica of an earlier
// release holding the lane stops this one, and a waiting replica's one-statement check sees an
// applier of either release.
func TestApplierHoldsTheKeyOfEarlierReleases(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	m := newMigrator(t, cc, migrator.Lane{Name: "fast", FS: twoFiles})
	key, err := m.LockKey(ctx, conn, "fast")
	if err != nil {
		t.Fatal(err)
	}
	old, err := engine.ApplierLockKey(m, "fast")
	if err != nil || old == key {
		t.Fatalf("applier lock key = %d, %v; LockKey = %d: an unqualified default name resolves to another key", old, err, key)
	}
	// An earlier release applying the lane holds only the old key.
	if _, err := conn.Exec(ctx, "select pg_advisory_lock($1)", old); err != nil {
		t.Fatal(err)
	}
	if _, err := m.TryMigrate(ctx, "fast"); !errors.Is(err, migrator.ErrLocked) {
		t.Fatalf("TryMigrate while an earlier release holds the lane = %v, want ErrLocked", err)
	}
	if st, err := m.Status(ctx, conn); err != nil || !st[0].Locked {
		t.Fatalf("status while an earlier release holds the lane: %+v, %v", st, err)
	}
	if _, err := conn.Exec(ctx, "select pg_advisory_unlock($1)", old); err != nil {
		t.Fatal(err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_locks where locktype = 'advisory' and granted and database = (select oid from pg_database where datname = current_database())"); n != 0 {
		t.Fatalf("%d advisory locks left after the refused attempt", n)
	}
	if _, err := m.TryMigrate(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
}
