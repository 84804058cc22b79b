package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
)

// TestFaultRestoreMovesVersionsBackwards restores the database from a backup taken before the
// slow lane ran, under two running `lanes serve` replicas that know the lane done: each replica
// notices the lower version on its next read (the reconnect after the restore), logs it as an
// error and reports it in /lanes (regressed, not done); one of them applies the lane again, each
// migration committed once, and both report it done again. Before, both kept reporting the
// lane done at its old version for ever, while the database had neither its index nor its rows.
func TestFaultRestoreMovesVersionsBackwards(t *testing.T) {
	t.Parallel()
	c := startCluster(t, pgcluster.Options{})
	dbURL := c.ConnString("postgres")
	dir := testkit.WriteTree(t, map[string]string{
		"fast/001_items.sql": "create table items (id int primary key);",
		// Applied again after the restore, it lasts 10 s (the marker exists only in the backup),
		// longer than the listeners' reconnect backoff (at most 5 s): both replicas read the
		// restored version before the lane is back, whatever order they reconnect in.
		"slow/001_index.sql": "select pg_sleep(case when to_regclass('restore_marker') is null then 0 else 10 end);\ncreate index items_id_desc on items (id desc);",
		"slow/002_seed.sql":  "insert into items select g from generate_series(1, 100) g;",
	})
	env := []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir}
	if res := runLanes(t, env, "migrate", "--lane", "fast"); res.code != 0 {
		t.Fatalf("migrate --lane fast: %v", res)
	}
	conn := pgtest.Connect(t, dbURL)
	if _, err := conn.Exec(t.Context(), "create table restore_marker ()"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	backup, err := c.Backup(ctx) // fast lane applied, slow lane not yet
	if err != nil {
		t.Fatal(err)
	}
	conn = pgtest.Connect(t, dbURL) // the backup restarted the server
	if _, err := conn.Exec(t.Context(), "drop table restore_marker"); err != nil {
		t.Fatal(err)
	}

	rs := []*replica{startReplica(t, "g1", dbURL, dir), startReplica(t, "g2", dbURL, dir)}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" knows the slow lane done", 60*time.Second, func() bool {
			k, ok := r.knows("slow")
			return ok && k.Done && k.Version == 2
		})
	}

	if err := c.Restore(ctx, backup); err != nil {
		t.Fatal(err)
	}
	restored := time.Now()
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" reports the regression", 60*time.Second, func() bool {
			k, ok := r.knows("slow")
			return ok && k.Regressed != nil
		})
		k, _ := r.knows("slow")
		if k.Regressed.From != 2 || k.Regressed.To != 0 {
			t.Errorf("replica %s: regression %+v, want from 2 to 0", r.name, *k.Regressed)
		}
		if k.Done && k.Version < 2 {
			t.Errorf("replica %s reports the lane done at version %d", r.name, k.Version)
		}
	}
	figure(t, "regression_noticed_after_restore", time.Since(restored), 0)
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" knows the slow lane done again", 90*time.Second, func() bool {
			k, ok := r.knows("slow")
			return ok && k.Done && k.Version == 2
		})
	}
	figure(t, "reapplied_after_restore", time.Since(restored), 0)

	conn = pgtest.Connect(t, dbURL)
	if v := pgtest.Scalar[int](t, conn, "select max(version) from lanes_slow_version"); v != 2 {
		t.Errorf("slow lane version %d after re-application, want 2", v)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from items"); n != 100 {
		t.Errorf("%d rows in items, want 100 (the slow lane's seed once)", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_indexes where indexname = 'items_id_desc'"); n != 1 {
		t.Errorf("index items_id_desc: %d, want 1", n)
	}
	for v := 1; v <= 2; v++ { // the history was restored too: these are the runs after the restore
		if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where lane = 'slow' and version = $1 and error is null", v); n != 1 {
			t.Errorf("slow lane version %d committed %d times after the restore, want once", v, n)
		}
	}
	for _, r := range rs {
		log := r.log.String()
		if !strings.Contains(log, `"level":"error"`) || !strings.Contains(log, "moved backwards") {
			t.Errorf("replica %s did not log the regression as an error", r.name)
		}
	}
}
