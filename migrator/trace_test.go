package migrator_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// traced records what a Trace's hooks were called with.
type traced struct {
	mu       sync.Mutex
	waits    []bool // acquired
	waited   time.Duration
	versions []int32
	errs     []error
}

func (tr *traced) trace() *migrator.Trace {
	return &migrator.Trace{
		LockWaited: func(_ string, d time.Duration, acquired bool) {
			tr.mu.Lock()
			defer tr.mu.Unlock()
			tr.waits, tr.waited = append(tr.waits, acquired), tr.waited+d
		},
		MigrationDone: func(_ string, v int32, _ string, _ time.Duration, err error) {
			tr.mu.Lock()
			defer tr.mu.Unlock()
			tr.versions, tr.errs = append(tr.versions, v), append(tr.errs, err)
		},
	}
}

// lockTries is a pgx tracer that calls itself with the connection of every lane lock attempt
// that has finished.
type lockTries func(conn *pgx.Conn)

type lockTryKey struct{}

func (c lockTries) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	return context.WithValue(ctx, lockTryKey{}, strings.Contains(d.SQL, "pg_try_advisory_lock"))
}

func (c lockTries) TraceQueryEnd(ctx context.Context, conn *pgx.Conn, d pgx.TraceQueryEndData) {
	if try, _ := ctx.Value(lockTryKey{}).(bool); try && d.Err == nil {
		c(conn)
	}
}

func TestTraceReportsLockWaitAndMigrations(t *testing.T) {
	t.Parallel()
	cc, admin := setup(t)
	ctx := ctxT(t)
	lane := migrator.Lane{Name: "fast", FS: fstest.MapFS{
		"001_a.sql": testkit.File("create table a (i int);"),
		"002_b.sql": testkit.File("create table b (i int);"),
		"003_c.sql": testkit.File("select * from no_such_table;"),
	}}
	// The migrator's connections report each finished lock attempt, so the lock is released only
	// after an attempt has found it held (pg_stat_activity shows the statement as soon as it is
	// prepared, before it runs: releasing then let the migrator take the lock at its first try).
	tried := make(chan struct{}, 1)
	cc = cc.Copy()
	cc.Tracer = lockTries(func(*pgx.Conn) {
		select {
		case tried <- struct{}{}:
		default:
		}
	})
	m := newMigrator(t, cc, lane)
	key, err := m.LockKey(ctx, admin, "fast")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Exec(ctx, "select pg_advisory_lock($1)", key); err != nil {
		t.Fatal(err)
	}
	var tr traced
	done := make(chan error, 1)
	go func() {
		_, err := m.Migrate(migrator.WithTrace(ctx, tr.trace()), "fast")
		done <- err
	}()
	select {
	case <-tried: // an attempt finished while the lock was held: it failed, and Migrate waits
	case err := <-done:
		t.Fatalf("Migrate returned before trying the lock: %v", err)
	case <-ctx.Done():
		t.Fatal("the migrator never tried the lock")
	}
	if _, err := admin.Exec(ctx, "select pg_advisory_unlock($1)", key); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err == nil {
		t.Fatal("Migrate succeeded past a bad migration")
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.waits) != 1 || !tr.waits[0] || tr.waited <= 0 {
		t.Errorf("LockWaited calls: %v (waited %s), want one, acquired", tr.waits, tr.waited)
	}
	if len(tr.versions) != 3 || tr.versions[0] != 1 || tr.versions[2] != 3 || tr.errs[0] != nil || tr.errs[1] != nil || tr.errs[2] == nil {
		t.Errorf("MigrationDone calls: versions %v errors %v", tr.versions, tr.errs)
	}

	// Without a Trace in the context nothing is called, and the free lock is no wait.
	var none traced
	if _, err := m.Migrate(migrator.WithTrace(ctx, none.trace()), "fast"); err == nil {
		t.Fatal("Migrate succeeded past a bad migration")
	}
	if len(none.waits) != 0 || len(none.versions) != 1 {
		t.Errorf("second run: waits %v, versions %v", none.waits, none.versions)
	}
}
