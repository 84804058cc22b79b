package migrator_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/faultproxy"
	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// silenceBound is the SilenceBound of the tests below: short, so that they take seconds.
const silenceBound = time.Second

// silenceSetup returns a fresh database's config and connection, with a table runs (app text)
// in it, and a fault proxy in front of it with the config through the proxy.
func silenceSetup(t *testing.T) (cc *pgx.ConnConfig, conn *pgx.Conn, proxied *pgx.ConnConfig, proxy *faultproxy.Proxy) {
	t.Helper()
	cc, conn = setup(t)
	proxy, err := faultproxy.New(pgtest.ProxyTarget(t, cc.ConnString()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	if proxied, err = pgx.ParseConfig(pgtest.ThroughProxy(t, cc.ConnString(), proxy.Addr())); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctxT(t), "create table runs (app text not null)"); err != nil {
		t.Fatal(err)
	}
	return cc, conn, proxied, proxy
}

// silenceMigrator returns a Migrator of lane on cc named app (application_name), polling the
// lane's lock every 20 ms, with the tests' short SilenceBound, logging to logs.
func silenceMigrator(t *testing.T, cc *pgx.ConnConfig, app string, lane migrator.Lane, logs *logbuf.Buffer) *migrator.Migrator {
	t.Helper()
	cc = cc.Copy()
	cc.RuntimeParams["application_name"] = app
	m, err := migrator.New(cc, []migrator.Lane{lane}, migrator.Config{LockPollInterval: 20 * time.Millisecond, SilenceBound: silenceBound,
		Logger: zerolog.New(logs)})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestSilencedApplierIsEndedAndTakenOver: an applier whose path to the server goes silent in the
// middle of a migration (a proxy that keeps both sockets open and forwards nothing) stops
// renewing its heartbeat; a replica waiting for the lane (Migrate) ends the silent session once
// the heartbeat expired, logs it, and applies the lane. Once the path heals the old applier
// commits nothing: the migration's work and version are committed once, by the new holder.
func TestSilencedApplierIsEndedAndTakenOver(t *testing.T) {
	t.Parallel()
	cc, conn, proxied, proxy := silenceSetup(t)
	ctx := ctxT(t)
	entered := make(chan struct{}, 2)
	proceed := make(chan struct{})
	var once sync.Once
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background,
		Funcs: []migrator.GoMigration{{Version: 1, Name: "work", Up: func(ctx context.Context, tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "insert into runs values (current_setting('application_name'))"); err != nil {
				return err
			}
			entered <- struct{}{}
			first := false
			once.Do(func() { first = true })
			if first {
				<-proceed // the silenced applier: held here until the path heals
			}
			_, err := tx.Exec(ctx, "create table work (i int)")
			return err
		}}}}
	newSilent := func(cc *pgx.ConnConfig, app string, logs *logbuf.Buffer) *migrator.Migrator {
		return silenceMigrator(t, cc, app, lane, logs)
	}
	var oldLogs, newLogs logbuf.Buffer
	old := newSilent(proxied, "old", &oldLogs)
	oldDone := make(chan error, 1)
	go func() { _, err := old.Migrate(ctx, "slow"); oldDone <- err }()
	<-entered
	proxy.SetBlackhole(true)
	silenced := time.Now()

	taker := newSilent(cc, "taker", &newLogs)
	res, err := taker.Migrate(ctx, "slow")
	if err != nil || res.Applied != 1 {
		t.Fatalf("the waiting replica: %+v, %v; want the migration applied", res, err)
	}
	t.Logf("taken over %s after the path went silent (bound %s)", time.Since(silenced).Round(time.Millisecond), silenceBound)
	if !strings.Contains(newLogs.String(), "ended its session to take the lane over") || !strings.Contains(newLogs.String(), `"holder":`) {
		t.Errorf("the taker's log does not say it ended the silent applier's session:\n%s", newLogs.String())
	}

	proxy.SetBlackhole(false)
	close(proceed)
	select {
	case err := <-oldDone:
		// Its run stopped (the lease lost, the connection ended) and Migrate found the lane
		// done, or it reports the loss, or the end of its connection: the server's FATAL
		// ("terminating connection"), or the connection found closed ("conn closed": when its
		// own heartbeat's failure had not stopped the run yet, the healed proxy delivers the
		// ended session's close before the migration's next statement).
		if err != nil && !errors.Is(err, migrator.ErrLeaseLost) && !strings.Contains(err.Error(), "terminating connection") &&
			!strings.HasSuffix(err.Error(), "conn closed") {
			t.Errorf("the silenced applier: %v\n%s", err, oldLogs.String())
		}
	case <-ctx.Done():
		t.Fatal("the silenced applier did not return after the path healed")
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where lane = 'slow' and error is null"); n != 1 {
		t.Errorf("%d history rows, want 1", n)
	}
	if runs := pgtest.Scalar[string](t, conn, "select coalesce(string_agg(app, ','), '') from runs"); runs != "taker" {
		t.Errorf("runs committed by %q, want taker only", runs)
	}
	if !pgtest.Scalar[bool](t, conn, "select to_regclass('work') is not null") {
		t.Error("work was not created")
	}
}

// TestHealthyLongStatementIsNotEnded: a migration whose one statement runs several silence
// bounds keeps its lane (its heartbeat is renewed meanwhile): replicas waiting for it, through
// Migrate and through the successor's check (LaneFree), never end it; it is applied once.
func TestHealthyLongStatementIsNotEnded(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{
		"001_long.sql": testkit.File("create table work (i int);\ninsert into work values (1);\nselect pg_sleep(4);"),
	}}
	var logs logbuf.Buffer
	newM := func() *migrator.Migrator {
		m, err := migrator.New(cc, []migrator.Lane{lane}, migrator.Config{LockPollInterval: 20 * time.Millisecond, SilenceBound: silenceBound,
			Logger: zerolog.New(&logs)})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	type result struct {
		res migrator.Result
		err error
	}
	results := make(chan result, 2)
	applier := newM()
	go func() { r, err := applier.Migrate(ctx, "slow"); results <- result{r, err} }()
	testkit.Eventually(t, "the applier runs the long statement", time.Minute, func() bool {
		return pgtest.Scalar[bool](t, conn, "select exists (select 1 from pg_stat_activity where query like '%pg_sleep(4)%' and state = 'active' and pid <> pg_backend_pid())")
	})
	waiter := newM()
	go func() { r, err := waiter.Migrate(ctx, "slow"); results <- result{r, err} }()
	checker := pgtest.Connect(t, cc.ConnString())
	checks := 0
	for {
		free, err := engine.LaneFree(ctx, newM(), checker, "slow")
		if err != nil {
			t.Fatal(err)
		}
		if free {
			break
		}
		checks++
		time.Sleep(200 * time.Millisecond)
	}
	applied := 0
	for range 2 {
		r := <-results
		if r.err != nil {
			t.Fatalf("a replica: %v", r.err)
		}
		applied += r.res.Applied
	}
	if applied != 1 {
		t.Errorf("%d migrations applied in all, want 1", applied)
	}
	if strings.Contains(logs.String(), "ended its session") || strings.Contains(logs.String(), "could not renew") {
		t.Errorf("a healthy applier was taken for a silent one:\n%s", logs.String())
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from work"); n != 1 {
		t.Errorf("work has %d rows, want 1", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where error is null"); n != 1 {
		t.Errorf("%d history rows, want 1", n)
	}
	t.Logf("the lane was seen held %d times while its 4 s statement ran (bound %s)", checks, silenceBound)
}

// TestStalledLaneConnectionIsEndedByItsRenewer: only the applier's own connection goes silent
// (the proxy holds the bytes of the connection that sent the migration's marked statement; the
// heartbeat's connection, through the same proxy, flows), so the heartbeat stays fresh and no
// other replica would ever see a silent holder. The applier's renewer finds its connection
// waiting for an answer while the server's session sits idle in transaction, ends that session
// and stops the run; a waiting replica then takes the lane and applies it. The migration's
// work is committed once, by the taker; the stalled applier's Migrate waits for the lane again
// and finds it done, having applied nothing.
func TestStalledLaneConnectionIsEndedByItsRenewer(t *testing.T) {
	t.Parallel()
	cc, conn, proxied, proxy := silenceSetup(t)
	ctx := ctxT(t)
	const marker = "create table work /* the stalled statement */ (i int)"
	proxy.SetMarker(marker)
	proxy.SetSilenceMarked(true)
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background,
		Funcs: []migrator.GoMigration{{Version: 1, Name: "work", Up: func(ctx context.Context, tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "insert into runs values (current_setting('application_name'))"); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, marker)
			return err
		}}}}
	newM := func(cc *pgx.ConnConfig, app string, logs *logbuf.Buffer) *migrator.Migrator {
		return silenceMigrator(t, cc, app, lane, logs)
	}
	var oldLogs, newLogs logbuf.Buffer
	old := newM(proxied, "old", &oldLogs)
	type result struct {
		res migrator.Result
		err error
	}
	oldDone := make(chan result, 1)
	go func() { r, err := old.Migrate(ctx, "slow"); oldDone <- result{r, err} }()
	testkit.Eventually(t, "the applier's marked statement held by the proxy", time.Minute, func() bool {
		return pgtest.Scalar[bool](t, conn, "select exists (select 1 from pg_stat_activity where datname = current_database() and application_name = 'old' and state = 'idle in transaction' and query like 'insert into runs%')")
	})
	stalled := time.Now()

	// The taker waits for the lane; on the old code it never got it (the heartbeat stayed
	// fresh): the guard below fails it.
	tctx, cancel := context.WithTimeout(ctx, 30*silenceBound)
	defer cancel()
	res, err := newM(cc, "taker", &newLogs).Migrate(tctx, "slow")
	if err != nil || res.Applied != 1 {
		t.Fatalf("the waiting replica: %+v, %v; want the migration applied (the stalled applier's log:\n%s)", res, err, oldLogs.String())
	}
	t.Logf("taken over %s after the applier's connection stalled (bound %s)", time.Since(stalled).Round(time.Millisecond), silenceBound)
	if !strings.Contains(oldLogs.String(), "connection applying the lane went silent") {
		t.Errorf("the stalled applier's log does not say it ended its session:\n%s\nthe taker's:\n%s", oldLogs.String(), newLogs.String())
	}
	select {
	case r := <-oldDone:
		if r.err != nil || r.res.Applied != 0 || r.res.To != 1 {
			t.Errorf("the stalled applier: %+v, %v; want the lane found done at 1, nothing applied", r.res, r.err)
		}
	case <-ctx.Done():
		t.Fatal("the stalled applier's Migrate did not return")
	}
	proxy.SetSilenceMarked(false)
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where lane = 'slow' and error is null"); n != 1 {
		t.Errorf("%d history rows, want 1", n)
	}
	if runs := pgtest.Scalar[string](t, conn, "select coalesce(string_agg(app, ','), '') from runs"); runs != "taker" {
		t.Errorf("runs committed by %q, want taker only", runs)
	}
}

// TestClientWorkInsideATransactionIsNotEnded: a Go migration that works on the client between
// two statements of its transaction for several silence bounds leaves its session idle in
// transaction on the server all that time, but its connection is not waiting for an answer:
// neither its own renewer (the stall check) nor a waiting replica ends it; it is applied once.
func TestClientWorkInsideATransactionIsNotEnded(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background,
		Funcs: []migrator.GoMigration{{Version: 1, Name: "work", Up: func(ctx context.Context, tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "create table work (i int)"); err != nil {
				return err
			}
			time.Sleep(4 * silenceBound) // the client's own work, the transaction open
			_, err := tx.Exec(ctx, "insert into work values (1)")
			return err
		}}}}
	var logs logbuf.Buffer
	type result struct {
		res migrator.Result
		err error
	}
	results := make(chan result, 2)
	for _, app := range []string{"applier", "waiter"} {
		m := silenceMigrator(t, cc, app, lane, &logs)
		go func() { r, err := m.Migrate(ctx, "slow"); results <- result{r, err} }()
		if app == "applier" {
			testkit.Eventually(t, "the applier works with its transaction open", time.Minute, func() bool {
				return pgtest.Scalar[bool](t, conn, "select exists (select 1 from pg_stat_activity where datname = current_database() and application_name = 'applier' and state = 'idle in transaction' and query like 'create table work%')")
			})
		}
	}
	applied := 0
	for range 2 {
		r := <-results
		if r.err != nil {
			t.Fatalf("a replica: %v\n%s", r.err, logs.String())
		}
		applied += r.res.Applied
	}
	if applied != 1 {
		t.Errorf("%d migrations applied in all, want 1", applied)
	}
	if strings.Contains(logs.String(), "went silent") || strings.Contains(logs.String(), "ended its session") {
		t.Errorf("a working applier was taken for a silent one:\n%s", logs.String())
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from work"); n != 1 {
		t.Errorf("work has %d rows, want 1", n)
	}
}
