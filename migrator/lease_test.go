package migrator_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// pooledMigrator is a Migrator configured as behind a transaction pooler: its lane lock is a
// timed lease (the connection here is direct, which a lease does not need).
func pooledMigrator(t *testing.T, cc *pgx.ConnConfig, ttl time.Duration, lanes ...migrator.Lane) *migrator.Migrator {
	t.Helper()
	m, err := migrator.New(cc, lanes, migrator.Config{LockPollInterval: 20 * time.Millisecond, TransactionPooler: true, LeaseTTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestTimedLeaseAppliesExactlyOnce: replicas whose lane lock is a timed lease (as through a
// transaction pooler) and replicas holding a session lock, all at once, apply a lane exactly
// once; a slow migration outliving several lease periods keeps its lease by renewal.
func TestTimedLeaseAppliesExactlyOnce(t *testing.T) {
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
	const replicas = 6
	var wg sync.WaitGroup
	results := make([]migrator.Result, replicas)
	errs := make([]error, replicas)
	for i := range replicas {
		m := newMigrator(t, cc, lane)
		if i%2 == 0 {
			m = pooledMigrator(t, cc, 1500*time.Millisecond, lane)
		}
		wg.Go(func() { results[i], errs[i] = m.Migrate(ctx, "slow") })
	}
	testkit.Eventually(t, "one replica runs the migration", 2*time.Minute, func() bool { return runs.Load() > 0 })
	// Hold the lane for several lease periods: the holder renews its lease meanwhile.
	testkit.Eventually(t, "the lease renewed past its first period", 2*time.Minute, func() bool {
		return pgtest.Scalar[bool](t, conn, "select coalesce(bool_or(session_pid is not null or expires_at > acquired_at + interval '1 second'), false) from lanes_lease")
	})
	close(release)
	wg.Wait()
	applied := 0
	for i := range replicas {
		if errs[i] != nil {
			t.Fatalf("replica %d: %v", i, errs[i])
		}
		applied += results[i].Applied
	}
	// A holder whose lease expired on an overloaded machine (renewals late) loses the lane and
	// its work rolls back: the migration may run again, but commits once.
	if runs.Load() < 1 || applied != 2 {
		t.Fatalf("go migration ran %d times, %d migrations applied in all; want at least 1 and 2", runs.Load(), applied)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where lane = 'slow' and error is null"); n != 2 {
		t.Fatalf("%d history rows, want 2: each migration committed once", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from work"); n != 2 {
		t.Fatalf("rows = %d", n)
	}
}

// TestLeaseLostRefusesTheCommit: when another session takes the lane over while a migration
// runs (its lease's epoch moves on), the migration's commit is refused: its work rolls back,
// the version stays, no failure is recorded, and the error wraps ErrLeaseLost (and ErrLocked).
// Both lock forms: a timed lease and a session lock.
func TestLeaseLostRefusesTheCommit(t *testing.T) {
	t.Parallel()
	for _, timed := range []bool{true, false} {
		name := "session"
		if timed {
			name = "timed"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			cc, conn := setup(t)
			ctx := ctxT(t)
			lane := migrator.Lane{Name: "slow", Mode: migrator.Background,
				Funcs: []migrator.GoMigration{{Version: 1, Name: "work", Up: func(ctx context.Context, tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, "create table work (i int)"); err != nil {
						return err
					}
					// Another session takes the lane over meanwhile.
					_, err := conn.Exec(ctx, "update lanes_lease set epoch = epoch + 1, session_pid = null, expires_at = 'infinity'")
					return err
				}}}}
			m := newMigrator(t, cc, lane)
			if timed {
				m = pooledMigrator(t, cc, time.Minute, lane)
			}
			// TryMigrate returns the loss (Migrate would wait for the new holder).
			_, err := m.TryMigrate(ctx, "slow")
			if !errors.Is(err, migrator.ErrLeaseLost) || !errors.Is(err, migrator.ErrLocked) {
				t.Fatalf("err = %v, want ErrLeaseLost", err)
			}
			if pgtest.Scalar[bool](t, conn, "select to_regclass('work') is not null") {
				t.Error("the work of a run that lost its lease was committed")
			}
			if v := pgtest.Scalar[int](t, conn, "select version from lanes_slow_version"); v != 0 {
				t.Errorf("version = %d", v)
			}
			if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history"); n != 0 {
				t.Errorf("%d history rows: a lost lease is not a failure", n)
			}
		})
	}
}

// TestSessionAndTimedLocksExcludeEachOther: a replica holding the lane's session lock keeps out
// one taking a timed lease, and the other way round, so a fleet half behind a transaction pooler
// and half direct (a rolling change of configuration) still applies each lane once. Once the
// holder is gone, the other takes the lane.
func TestSessionAndTimedLocksExcludeEachOther(t *testing.T) {
	t.Parallel()
	cc, _ := setup(t)
	ctx := ctxT(t)
	for _, sessionFirst := range []bool{true, false} {
		entered, release := make(chan struct{}), make(chan struct{})
		name := map[bool]string{true: "s", false: "t"}[sessionFirst]
		lane := migrator.Lane{Name: name, Mode: migrator.Background,
			Funcs: []migrator.GoMigration{{Version: 1, Name: "hold", Up: func(ctx context.Context, tx pgx.Tx) error {
				close(entered)
				<-release
				return nil
			}}}}
		first, second := newMigrator(t, cc, lane), pooledMigrator(t, cc, time.Minute, lane)
		if !sessionFirst {
			first, second = second, first
		}
		done := make(chan error, 1)
		go func() { _, err := first.Migrate(ctx, name); done <- err }()
		select {
		case <-entered:
		case err := <-done:
			t.Fatalf("session first %v: first replica: %v", sessionFirst, err)
		}
		if _, err := second.TryMigrate(ctx, name); !errors.Is(err, migrator.ErrLocked) {
			t.Fatalf("session first %v: second replica: %v, want ErrLocked", sessionFirst, err)
		}
		conn := pgtest.Connect(t, cc.ConnString())
		if free, err := engine.LaneFree(ctx, second, conn, name); err != nil || free {
			t.Fatalf("session first %v: LaneFree = %v, %v while held", sessionFirst, free, err)
		}
		st, err := second.Status(ctx, conn)
		if err != nil || !st[0].Locked {
			t.Fatalf("session first %v: status %+v, %v: want locked", sessionFirst, st, err)
		}
		close(release)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if free, err := engine.LaneFree(ctx, second, conn, name); err != nil || !free {
			t.Fatalf("session first %v: LaneFree = %v, %v once released", sessionFirst, free, err)
		}
	}
}
