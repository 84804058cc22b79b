package main

// Failover tests (issue 13) at process level: one-shot commands across a server that restarts,
// is down, or turns read-only, against throwaway clusters (pgcluster). What a failover does to
// a client is what these do: sessions terminated (57P01), connections refused while no primary
// answers, writes refused (25006) by a server that is not the primary.

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
)

// TestMigrateRetriesAcrossServerRestartAndOutage runs `lanes migrate` on runsLanes: while the
// slow lane's long migration runs, the server is killed (sessions end without a word, as in a
// crash) and stays down until migrate has said it retries; then it starts again. migrate exits 0,
// every migration is applied exactly once (the killed one ran again from its start on the
// restarted server), and the log says the database was unusable and then usable again. On the
// old code migrate exited 1, the exit code of a failed migration.
func TestMigrateRetriesAcrossServerRestartAndOutage(t *testing.T) {
	t.Parallel()
	c := startCluster(t, pgcluster.Options{})
	dbURL := c.ConnString("postgres")
	dir := runsLanes(t)
	key := lockKey(t, dbURL, dir, "slow")
	p := startLanes(t, []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir, "PGAPPNAME=lanes-m1"}, "migrate", "--timeout", "2m")
	conn := pgtest.Connect(t, dbURL)
	waitForHolder(t, conn, key, "pg_sleep")
	hurryUp(t, conn) // the re-run sleeps 0.2 s; the running one would sleep its minute
	// The kill below loses what is not flushed yet (the cluster may run without synchronous
	// commit): make hurry's row durable first.
	if _, err := conn.Exec(t.Context(), "checkpoint"); err != nil {
		t.Fatal(err)
	}
	conn.Close(context.Background())
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "migrate says it retries", time.Minute, func() bool {
		return strings.Contains(p.stderr.String(), "no usable database")
	})
	if p.exited() {
		t.Fatalf("migrate exited while the server was down:\n%s", p.stderr.String())
	}
	if err := c.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	if code, _ := p.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("migrate exited %d across the outage:\n%s", code, p.stderr.String())
	}
	conn = pgtest.Connect(t, dbURL)
	runs := runsByVersion(t, conn)
	if len(runs[1]) != 1 || len(runs[2]) != 1 || len(runs[3]) != 1 || len(runs) != 3 {
		t.Errorf("runs = %v; want versions 1, 2 and 3 once each", runs)
	}
	checkHistoryExactlyOnce(t, conn, 4)
	if !strings.Contains(p.stderr.String(), "database usable again") {
		t.Errorf("migrate's log does not say the database was usable again:\n%s", p.stderr.String())
	}
	if n := strings.Count(p.stderr.String(), "no usable database"); n > 3 { // lost connection, 57P03, refused
		t.Errorf("migrate said %d times that no usable database answered; want once per kind of failure", n)
	}
}

// TestMigrateWaitsForAWritableServer points `lanes migrate` at a database that refuses writes
// (default_transaction_read_only, as a standby or a demoted primary refuses them with 25006):
// migrate retries, and finishes once the database takes writes. With a short --timeout it exits
// 4 (no usable database), not 1 (a failed migration), and applies nothing; a migration that
// fails by itself exits 1 at once, without retrying.
func TestMigrateWaitsForAWritableServer(t *testing.T) {
	t.Parallel()
	c := startCluster(t, pgcluster.Options{})
	admin := pgtest.Connect(t, c.ConnString("postgres"))
	for _, sql := range []string{"create database ro", "alter database ro set default_transaction_read_only = on"} {
		if _, err := admin.Exec(t.Context(), sql); err != nil {
			t.Fatal(err)
		}
	}
	dbURL := c.ConnString("ro")
	dir := testkit.WriteTree(t, map[string]string{"fast/001_a.sql": "create table a (i int);", "slow/001_b.sql": "create table b (i int);"})
	env := []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir}

	res := runLanes(t, env, "migrate", "--timeout", "1s")
	if res.code != 4 || !strings.Contains(res.stderr, "read-only") {
		t.Fatalf("migrate on a read-only database with --timeout 1s: want exit 4 saying read-only, got %v", res)
	}
	p := startLanes(t, env, "migrate", "--timeout", "2m")
	testkit.Eventually(t, "migrate says it retries", time.Minute, func() bool {
		return strings.Contains(p.stderr.String(), "no usable database")
	})
	if _, err := admin.Exec(t.Context(), "alter database ro reset default_transaction_read_only"); err != nil {
		t.Fatal(err)
	}
	if code, _ := p.wait(t, time.Minute); code != 0 {
		t.Fatalf("migrate exited %d once the database took writes:\n%s", code, p.stderr.String())
	}
	conn := pgtest.Connect(t, dbURL)
	checkHistoryExactlyOnce(t, conn, 2)

	bad := testkit.WriteTree(t, map[string]string{"fast/001_a.sql": "create table a (i int);", "slow/001_b.sql": "create table b (i int);", "slow/002_bad.sql": "select 1/0;"})
	res = runLanes(t, []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + bad}, "migrate", "--timeout", "2m")
	if res.code != 1 || !strings.Contains(res.stderr, "002_bad.sql") || strings.Contains(res.stderr, "no usable database") {
		t.Errorf("migrate with a failing migration: want exit 1 at once naming 002_bad.sql, got %v", res)
	}
	if res.took > time.Minute {
		t.Errorf("a failing migration took %s to report: it was retried", res.took)
	}
	var n int
	if err := conn.QueryRow(t.Context(), "select count(*) from lanes_history where name = '002_bad.sql'").Scan(&n); err != nil || n != 1 {
		t.Errorf("002_bad.sql attempts recorded: %d (%v), want 1", n, err)
	}
}

// TestServeWaitsForAPrimary starts `lanes serve` while its server is down (as during a crash
// failover): it does not exit, /healthz answers 200 and /readyz is not ready; once the server is
// back the replica applies its blocking lane and becomes ready. Then, with every connection slot
// taken (53300 too many clients), a second replica keeps trying too, and becomes ready once slots
// are free. On the old code serve exited 1 within milliseconds.
func TestServeWaitsForAPrimary(t *testing.T) {
	t.Parallel()
	c := startCluster(t, pgcluster.Options{MaxConnections: 8})
	admin := pgtest.Connect(t, c.ConnString("postgres"))
	for _, sql := range []string{"create role app login", "create database appdb owner app"} {
		if _, err := admin.Exec(t.Context(), sql); err != nil {
			t.Fatal(err)
		}
	}
	admin.Close(context.Background())
	dbURL := strings.Replace(c.ConnString("appdb"), "postgres@", "app@", 1)
	dir := testkit.WriteTree(t, map[string]string{"fast/001_a.sql": "create table a (i int);", "slow/001_b.sql": "create table b (i int);"})
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	r := startReplica(t, "down", dbURL, dir)
	testkit.Eventually(t, "the replica says it waits for a database", time.Minute, func() bool {
		return strings.Contains(r.log.String(), "no usable database yet")
	})
	if code, _ := r.get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d while no database answers, want 200", code)
	}
	if r.ready() {
		t.Fatal("/readyz is ready without a database")
	}
	if err := c.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the replica ready once the server is back", time.Minute, r.ready)

	// The first replica's part ends here: stopped, it cannot free a slot (an idle connection it
	// closes) after the slots are filled, which let the second replica in.
	if code, _ := r.get("/healthz"); code != 200 {
		t.Errorf("replica %s: /healthz = %d, want 200", r.name, code)
	}
	r.stop(t)
	// Its sessions end after the process: wait until they have, or a slot one of them frees
	// after the filling lets the second replica in. The superuser session that watches stays
	// open to the end, so that it frees no slot either.
	watch := pgtest.Connect(t, c.ConnString("postgres"))
	testkit.Eventually(t, "the stopped replica's sessions end", time.Minute, func() bool {
		return pgtest.Scalar[int](t, watch, "select count(*) from pg_stat_activity where datname = 'appdb'") == 0
	})
	// Fill every slot a non-superuser may take (max_connections 8 minus 3 reserved).
	var held []*pgx.Conn
	t.Cleanup(func() {
		for _, h := range held {
			h.Close(context.Background())
		}
	})
	for {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		h, err := pgx.Connect(ctx, dbURL)
		cancel()
		if err != nil {
			if !strings.Contains(err.Error(), "53300") {
				t.Fatalf("filling the connection slots: %v", err)
			}
			break
		}
		held = append(held, h)
	}
	full := startReplica(t, "full", dbURL, dir)
	testkit.Eventually(t, "the second replica says it waits for a database", time.Minute, func() bool {
		return strings.Contains(full.log.String(), "53300")
	})
	if full.ready() {
		t.Fatal("the second replica is ready without a connection")
	}
	if code, _ := full.get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d while every connection slot is taken, want 200", code)
	}
	for _, h := range held {
		h.Close(context.Background())
	}
	held = nil
	testkit.Eventually(t, "the second replica ready once slots are free", time.Minute, full.ready)
	if code, _ := full.get("/healthz"); code != 200 {
		t.Errorf("replica %s: /healthz = %d at the end, want 200", full.name, code)
	}
}

// TestServeWaitsThroughServerStartup starts a replica while its server refuses connections with
// 57P03 (cannot connect now): a standby in recovery with hot_standby off answers every
// connection so, as a server still starting up or recovering does ("the database system is
// starting up"). The replica keeps trying, answers /healthz with 200 and /readyz with "not
// ready", and does not exit; once the server accepts connections (promoted) it applies the lanes
// and is ready.
func TestServeWaitsThroughServerStartup(t *testing.T) {
	t.Parallel()
	primary := startCluster(t, pgcluster.Options{})
	admin := pgtest.Connect(t, primary.ConnString("postgres"))
	for _, sql := range []string{"create role app login", "create database appdb owner app"} {
		if _, err := admin.Exec(t.Context(), sql); err != nil {
			t.Fatal(err)
		}
	}
	admin.Close(context.Background())
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	standby := pgtest.StartStandby(t, primary, 5*time.Minute)
	if err := standby.SetParams(map[string]string{"hot_standby": "off"}); err != nil {
		t.Fatal(err)
	}
	if err := standby.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	var pgErr *pgconn.PgError
	if c, err := pgx.Connect(ctx, standby.ConnString("postgres")); !errors.As(err, &pgErr) || pgErr.Code != "57P03" {
		if c != nil {
			c.Close(context.Background())
		}
		t.Fatalf("connecting to the standby without hot_standby: %v, want 57P03", err)
	}

	dbURL := strings.Replace(standby.ConnString("appdb"), "postgres@", "app@", 1)
	dir := testkit.WriteTree(t, map[string]string{"fast/001_a.sql": "create table a (i int);", "slow/001_b.sql": "create table b (i int);"})
	r := startReplica(t, "starting", dbURL, dir)
	testkit.Eventually(t, "the replica says it waits for the server (57P03)", 2*time.Minute, func() bool {
		return strings.Contains(r.log.String(), "57P03")
	})
	if code, _ := r.get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d while the server refuses connections (57P03), want 200", code)
	}
	if r.ready() {
		t.Fatal("/readyz is ready while the server refuses connections")
	}
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		t.Fatalf("the replica exited while the server was starting: %v\n%s", err, r.log.String())
	default:
	}
	if err := standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the replica ready once the server accepts connections", 2*time.Minute, r.ready)
	testkit.Eventually(t, "the slow lane applied", 2*time.Minute, func() bool {
		k, ok := r.knows("slow")
		return ok && k.Done
	})
	if code, _ := r.get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d at the end, want 200", code)
	}
	if strings.Contains(r.log.String(), `"level":"fatal"`) {
		t.Errorf("the replica logged a fatal error:\n%s", r.log.String())
	}
}
