package app_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

func knownLane(r *app.Runtime, lane string) app.KnownLane {
	for _, k := range r.View().Lanes {
		if k.Name == lane {
			return k
		}
	}
	return app.KnownLane{}
}

// A lane whose version moves backwards under running replicas (the database restored to an
// earlier state) is noticed on the next read, logged as an error and shown in the view; the lane is not done anymore (Done hands out a new channel) and is applied again,
// once, to its latest version. Before, every replica kept its cached "done" for ever.
func TestVersionMovedBackwardsIsNoticedAndAppliedAgain(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// The slow lane's first migration runs at once the first time; applied again, it waits
	// for release, so that the restored state lasts until every replica has read it.
	var runs atomic.Int32
	release := make(chan struct{})
	slow := migrator.Lane{Name: "slow", Mode: migrator.Background,
		FS: fstest.MapFS{"002_row.sql": testkit.File("insert into s1 values (1);")},
		Funcs: []migrator.GoMigration{{Version: 1, Name: "table", Up: func(ctx context.Context, tx pgx.Tx) error {
			if runs.Add(1) > 1 {
				select {
				case <-release:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			_, err := tx.Exec(ctx, "create table s1 (i int)")
			return err
		}}}}
	var logs [2]logbuf.Buffer
	var rs [2]*app.Runtime
	for i := range rs {
		// Replica 0 closes its listener once every lane is done (the default) and notices the
		// regression on its next status read; replica 1 keeps listening and notices it on its
		// listener's reconnect too.
		rs[i] = e.runtimeWith(func(c *app.Config) { c.Logger, c.KeepListening = zerolog.New(&logs[i]), i == 1 }, fastLane, slow)
		if err := rs[i].Start(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range rs {
		waitDone(t, r, "slow")
	}
	before, err := rs[0].Done("slow")
	if err != nil {
		t.Fatal(err)
	}
	// The restore: the slow lane's effects, version and history back to before it ran.
	e.exec(`begin;
drop table s1;
delete from lanes_history where lane = 'slow';
update lanes_slow_version set version = 0;
commit`)

	// Each replica notices it on its next read of the lane: here a Status call on replica 0,
	// the reconnect after its sessions end on replica 1, or whichever comes first of those and
	// the notifications of the other replica applying the lane again.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := rs[0].Status(ctx); err != nil {
		t.Fatal(err)
	}
	e.exec("select pg_terminate_backend(pid) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()")
	for i, r := range rs {
		testkit.Eventually(t, "the replica notices the regression", 20*time.Second, func() bool { return knownLane(r, "slow").Regressed != nil })
		if rg := knownLane(r, "slow").Regressed; rg.From != 2 || rg.To >= 2 {
			t.Errorf("replica %d: regression %+v, want from 2 to a lower version", i, rg)
		}
	}
	after, err := rs[0].Done("slow")
	if err != nil {
		t.Fatal(err)
	}
	if after == before || rs[0].IsDone("slow") {
		t.Fatal("the lane still counts as done after the regression")
	}
	close(release)
	select {
	case <-after:
	case <-time.After(20 * time.Second):
		t.Fatalf("the lane was never applied again (version %d)", rs[0].Version("slow"))
	}
	waitDone(t, rs[1], "slow")
	var rows, applied int
	if err := e.query("select count(*) from s1", &rows); err != nil {
		t.Fatalf("the slow lane was not applied again: %v", err)
	}
	if err := e.query("select count(*) from lanes_history where lane = 'slow' and error is null", &applied); err != nil {
		t.Fatal(err)
	}
	// (The terminated sessions may include the one applying it again: a killed run rolls back
	// and is retried, so runs may exceed 2, but each migration commits once.)
	if rows != 1 || applied != 2 || runs.Load() < 2 {
		t.Fatalf("after re-application: %d rows, %d history rows, %d runs of the Go migration; want 1, 2 and at least 2 (each migration committed once again)", rows, applied, runs.Load())
	}
	for i := range rs {
		if !strings.Contains(logs[i].String(), `"level":"error"`) || !strings.Contains(logs[i].String(), "moved backwards") {
			t.Errorf("replica %d did not log the regression as an error:\n%s", i, logs[i].String())
		}
	}
}

// query runs a one-value query on a new connection.
func (e *env) query(sql string, dst any) error {
	conn, err := pgx.ConnectConfig(context.Background(), e.cc)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return conn.QueryRow(context.Background(), sql).Scan(dst)
}
