package main

// End-to-end tests: real `lanes serve` processes, several replicas sharing one database.
//
// The database comes from pgtest: TEST_DATABASE_URL, else a PostgreSQL container started with
// testcontainers-go (image LANES_TEST_PG_IMAGE, default the official postgres image), else a
// throwaway cluster. CI runs this file twice: once against the local server and once with
// LANES_TEST_BACKEND=container, so the testcontainers path is proven too. The helpers (replicas,
// the binary, TestMain) are in helpers_test.go; the fault-injection tests in faults_test.go.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// slowGate is the advisory lock that the slow lane's first migration waits for: a test that
// holds it (holdSlowLane) decides when the slow lane may finish, instead of racing a sleep.
const slowGate = 7_340_001

// migrationsDir writes a fast lane and a slow lane whose first migration takes slowSeconds,
// and does not end before the slowGate advisory lock is free.
func migrationsDir(t *testing.T, slowSeconds float64) string {
	dir := t.TempDir()
	files := map[string]string{
		"fast/001_create_example.sql":   "create table example (id int primary key, name text not null);",
		"fast/002_populate_example.sql": "insert into example select g, 'seed-' || g from generate_series(1, 10) g;",
		"slow/001_load_example.sql": fmt.Sprintf("select pg_sleep(%g);\nselect pg_advisory_xact_lock(%d);\n"+
			"insert into example select g, 'loaded-' || g from generate_series(11, 1000) g;", slowSeconds, slowGate),
		"slow/002_index_example.sql": "---- tern: disable-tx ----\ndrop index concurrently if exists example_name_idx;\ncreate index concurrently example_name_idx on example (name);",
	}
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestReplicasShareTheLanes starts three replicas at once on an empty database, then a fourth
// while the slow lane runs, and checks: all become ready before the slow lane ends, every
// migration is applied exactly once, every replica learns of the slow lane's completion, the
// ones that did not apply it through LISTEN/NOTIFY, and all stop cleanly on SIGTERM.
func TestReplicasShareTheLanes(t *testing.T) {
	dbURL := pgtest.NewDB(t)
	dir := migrationsDir(t, 0.5)
	release := holdSlowLane(t, dbURL)
	var rs []*replica
	for i := range 3 {
		rs = append(rs, startReplica(t, fmt.Sprintf("r%d", i+1), dbURL, dir))
	}
	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" ready", 30*time.Second, r.ready)
	}
	for _, r := range rs {
		if k := r.known(t, "slow"); k.Done {
			t.Fatalf("replica %s: slow lane done already; the test needs it running", r.name)
		}
	}
	// A replica started while the slow lane runs becomes ready while it still runs.
	late := startReplica(t, "late", dbURL, dir)
	testkit.Eventually(t, "late replica ready", 30*time.Second, late.ready)
	st := late.status(t)
	if st.Lanes[1].Name != "slow" || st.Lanes[1].Done() {
		t.Fatalf("late replica became ready only after the slow lane: %+v", st.Lanes)
	}
	rs = append(rs, late)
	release()

	for _, r := range rs {
		testkit.Eventually(t, "replica "+r.name+" learns the slow lane is done", 60*time.Second, func() bool { return r.known(t, "slow").Done })
	}
	via := map[string]int{}
	for _, r := range rs {
		k := r.known(t, "slow")
		via[k.Via]++
		// Listening, or idle: once every lane is done a replica closes its listener.
		if v := r.status(t).Replica; v.Listener != "listening" && v.Listener != "idle" {
			t.Fatalf("replica %s listener is %s", r.name, v.Listener)
		}
	}
	if via["notification"] < len(rs)-1 || via["notification"]+via["applied"] != len(rs) {
		t.Fatalf("how the replicas learned the slow lane was done: %v; want all but the applier by notification", via)
	}
	if n := pgtest.QueryURL[int](t, dbURL, "select count(*) from lanes_history where error is null"); n != 4 {
		t.Fatalf("history has %d successful migrations, want 4 (each applied exactly once)", n)
	}
	if n := pgtest.QueryURL[int](t, dbURL, "select count(*) from example"); n != 1000 {
		t.Fatalf("example has %d rows, want 1000", n)
	}
	for _, r := range rs {
		r.stop(t)
	}
}

// TestStatusAndWaitAgainstLiveReplicas checks the CLI's status and wait against the database
// the replicas share: wait returns once the slow lane is done, without applying anything.
func TestStatusAndWaitAgainstLiveReplicas(t *testing.T) {
	dbURL := pgtest.NewDB(t)
	dir := migrationsDir(t, 2)
	r := startReplica(t, "w1", dbURL, dir)
	testkit.Eventually(t, "replica ready", 30*time.Second, r.ready)
	wait := exec.Command(lanesBinary(t), "wait", "--lane", "slow", "--timeout", "60s")
	wait.Env = append(os.Environ(), "DATABASE_URL="+dbURL, "LANES_MIGRATIONS="+dir, "LANES_LOG_FORMAT=json")
	out, err := wait.CombinedOutput()
	if err != nil {
		t.Fatalf("lanes wait: %v\n%s", err, out)
	}
	status := exec.Command(lanesBinary(t), "status", "--json")
	status.Env = wait.Env
	out, err = status.Output()
	if err != nil {
		t.Fatalf("lanes status: %v", err)
	}
	var st struct {
		Lanes []migrator.LaneStatus `json:"lanes"`
	}
	if err := json.Unmarshal(out, &st); err != nil || len(st.Lanes) != 2 || st.Lanes[1].State != migrator.StateDone || st.Lanes[1].Version != 2 {
		t.Fatalf("status --json = %s (%v)", out, err)
	}
	r.stop(t)
}

// holdSlowLane takes the slowGate advisory lock on a session of its own, so the slow lane
// cannot finish until the returned function releases it (also called at the end of the test).
func holdSlowLane(t *testing.T, dbURL string) (release func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "select pg_advisory_lock($1)", slowGate); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := conn.Close(ctx); err != nil {
				t.Errorf("release the slow lane: %v", err)
			}
		})
	}
	t.Cleanup(release)
	return release
}
