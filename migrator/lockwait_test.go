package migrator_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// TestBatchedLockWaitsThrottleThenRetryLater holds a lock on a row the walk must update: each
// batch waits past its lock timeout, the walk says it is throttled by lock waits and retries
// smaller after a pause, then stops with a transient error naming the range; once the lock is
// gone, the next run finishes from the cursor.
func TestBatchedLockWaitsThrottleThenRetryLater(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	sparseItems(t, conn, 300)
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"001_visit.sql": testkit.File(countVisits)}}
	m := batchedMigrator(t, cc, migrator.BatchConfig{Target: 20 * time.Millisecond, LockTimeout: 50 * time.Millisecond}, lane)
	holder, err := engine.Connect(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(context.Background())
	tx, err := holder.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "select 1 from items where id = 600 for update"); err != nil {
		t.Fatal(err)
	}
	_, err = m.Migrate(ctx, "slow")
	var me *migrator.MigrationError
	if !errors.As(err, &me) || me.SQLState != "55P03" || !me.Transient() || !strings.Contains(err.Error(), "batch (") {
		t.Fatalf("err = %v, want a transient lock timeout naming the batch", err)
	}
	if s := pgtest.Scalar[int](t, conn, "select count(*) from lanes_progress where throttled like 'lock waits%'"); s != 1 {
		t.Fatal("the throttle reason was not recorded")
	}
	cursor := pgtest.Scalar[int](t, conn, "select cursor::int from lanes_progress")
	if cursor >= 600 || pgtest.Scalar[int](t, conn, "select count(*) from items where n <> 1 and id <= $1", cursor) != 0 {
		t.Fatalf("cursor %d", cursor)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if res, err := m.Migrate(ctx, "slow"); err != nil || res.To != 1 {
		t.Fatalf("after the lock = %+v, %v", res, err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from items where n <> 1"); n != 0 {
		t.Fatalf("%d rows not visited exactly once", n)
	}
}
