package app_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// TestProgressReachesReplicasAndPauseResume runs a batched migration on one of two replicas:
// the other learns its progress from the announcement alone, both see the lane paused (ready
// all along), and after resume the walk finishes with every row visited once.
func TestProgressReachesReplicasAndPauseResume(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	admin, err := pgx.ConnectConfig(ctx, e.cc)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())
	if _, err := admin.Exec(ctx, "create table items (id int8 primary key, n int not null default 0); insert into items (id) select generate_series(1, 300); analyze items"); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	gates := [3]chan struct{}{make(chan struct{}), make(chan struct{}), make(chan struct{})}
	reached := make(chan int32, 10)
	walk := func(ctx context.Context, tx pgx.Tx, lo, hi int64) error {
		c := calls.Add(1)
		if _, err := tx.Exec(ctx, "update items set n = n + 1 where id > $1 and id <= $2", lo, hi); err != nil {
			return err
		}
		if c <= 2 {
			reached <- c
			select {
			case <-gates[c]:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	slow := migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{
		{Version: 1, Name: "visit", Backfill: &migrator.Backfill{Table: "items", Key: "id", Size: 10, Range: walk}}}}
	r1 := e.runtime(fastLane, slow)
	r2 := e.runtime(fastLane, slow)
	for _, r := range []*app.Runtime{r1, r2} {
		if err := r.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if c := <-reached; c != 1 {
		t.Fatalf("batch %d", c)
	}
	var applier, other *app.Runtime
	testkit.Eventually(t, "one replica applying, the other waiting", 10*time.Second, func() bool {
		k1, k2 := known(r1, "slow"), known(r2, "slow")
		switch {
		case k1.Role == "applying" && k2.Role == "waiting":
			applier, other = r1, r2
		case k2.Role == "applying" && k1.Role == "waiting":
			applier, other = r2, r1
		}
		return applier != nil
	})
	if p := other.Progress("slow"); p != nil && p.Done != 0 {
		t.Fatalf("progress before the first batch committed: %+v", p)
	}
	close(gates[1]) // batch 1 commits and announces its progress
	if c := <-reached; c != 2 {
		t.Fatalf("batch %d", c)
	}
	testkit.Eventually(t, "the waiting replica learns the progress", 5*time.Second, func() bool {
		p := other.Progress("slow")
		return p != nil && p.Done == 10 && p.Total == 300 && p.File == "001_visit.go" && p.Percent != nil && *p.Percent == 3.3
	})
	if k := known(other, "slow"); k.Progress == nil || k.Progress.Done != 10 {
		t.Fatalf("view = %+v", k)
	}

	// Pause while batch 2 runs: it commits, and the walk stops at the next boundary.
	m, err := migrator.New(e.cc, []migrator.Lane{fastLane, slow}, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Pause(ctx, admin, "slow"); err != nil {
		t.Fatal(err)
	}
	close(gates[2])
	for _, r := range []*app.Runtime{r1, r2} {
		testkit.Eventually(t, "the lane seen paused", 10*time.Second, func() bool { return known(r, "slow").Paused && r.Ready() })
	}
	testkit.Eventually(t, "the applier stops", 10*time.Second, func() bool {
		st, err := applier.Status(ctx)
		return err == nil && st.Lanes[1].State == migrator.StatePaused && !st.Lanes[1].Locked
	})
	if c := calls.Load(); c != 2 {
		t.Fatalf("%d batches ran while paused", c)
	}
	if n, done := pgtest.Scalar[int](t, admin, "select count(*) from items where n = 1"), pgtest.Scalar[int](t, admin, "select done from lanes_progress"); n <= 10 || n != done {
		t.Fatalf("%d rows visited after two batches, progress says %d", n, done)
	}
	if err := m.Resume(ctx, admin, "slow"); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*app.Runtime{r1, r2} {
		if err := r.Wait(ctx, "slow"); err != nil {
			t.Fatal(err)
		}
		if p := r.Progress("slow"); p != nil {
			t.Fatalf("progress after the lane is done: %+v", p)
		}
	}
	if n := pgtest.Scalar[int](t, admin, "select count(*) from items where n <> 1"); n != 0 {
		t.Fatalf("%d rows not visited exactly once", n)
	}
}

func known(r *app.Runtime, lane string) app.KnownLane {
	for _, k := range r.View().Lanes {
		if k.Name == lane {
			return k
		}
	}
	return app.KnownLane{}
}
