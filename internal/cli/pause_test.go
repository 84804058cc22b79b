package cli

import (
	"context"
	"encoding/json"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/migrator"
)

// batchedFiles is a fast lane creating items and a slow lane whose batched file fails on the
// row with key 500 until it is fixed by hand.
var batchedFiles = map[string]string{
	"fast/001_items.sql": "create table items (id int4 primary key, n int not null default 0); insert into items (id) select generate_series(1, 1000); analyze items;",
	"slow/001_visit.sql": "---- lanes: batch table=items key=id size=100 ----\nupdate items set n = n + 1 + 1 / (id - 500) * 0 where id > $1 and id <= $2;",
}

func TestPauseResumeRetryAndStatusProgress(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, batchedFiles)
	vars["LANES_BATCH_TARGET"] = "5ms"
	if r := runCLI(t, vars, "pause", "--lane", "fast"); r.code != ExitError || !strings.Contains(r.stderr, "blocking lane") {
		t.Fatalf("pause of a blocking lane: %s", r)
	}
	if r := runCLI(t, vars, "pause", "--lane", "nope"); r.code != ExitUsage {
		t.Fatalf("pause of an unknown lane: %s", r)
	}
	if r := runCLI(t, vars, "pause"); r.code != ExitUsage || !strings.Contains(r.stderr, "--lane is required") {
		t.Fatalf("pause without a lane: %s", r)
	}
	// The batched file fails on key 500: the batches before it stay committed.
	if r := runCLI(t, vars, "migrate"); r.code != ExitError || !strings.Contains(r.stderr, "001_visit.sql") || !strings.Contains(r.stderr, "batch (") {
		t.Fatalf("migrate: %s", r)
	}
	st := statusOf(t, vars)
	p := st[1].Progress
	if st[1].State != migrator.StateFailed || p == nil || p.Total != 1000 || p.Done == 0 || p.Done >= 500 || p.Percent == nil || p.File != "001_visit.sql" {
		t.Fatalf("status after the failure: %+v, progress %+v", st[1], p)
	}
	table := runCLI(t, vars, "status")
	if !strings.Contains(table.stdout, "PROGRESS") || !strings.Contains(table.stdout, "%") {
		t.Fatalf("status table: %s", table)
	}
	if r := runCLI(t, vars, "pause", "--lane", "slow"); r.code != ExitOK {
		t.Fatalf("pause: %s", r)
	}
	if st := statusOf(t, vars); st[1].State != migrator.StatePaused || !st[1].Paused {
		t.Fatalf("paused lane: %+v", st[1])
	}
	// Fixed by hand, the failure is cleared by retry; a paused lane still does not run.
	conn, err := pgx.Connect(t.Context(), vars["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(t.Context(), "delete from items where id = 500"); err != nil {
		t.Fatal(err)
	}
	if r := runCLI(t, vars, "retry", "--lane", "slow"); r.code != ExitOK || !strings.Contains(r.stderr, "failure cleared") {
		t.Fatalf("retry: %s", r)
	}
	if r := runCLI(t, vars, "migrate"); r.code != ExitError || !strings.Contains(r.stderr, "paused") {
		t.Fatalf("migrate while paused: %s", r)
	}
	if r := runCLI(t, vars, "resume", "--lane", "slow"); r.code != ExitOK {
		t.Fatalf("resume: %s", r)
	}
	if r := runCLI(t, vars, "migrate"); r.code != ExitOK {
		t.Fatalf("migrate after resume: %s", r)
	}
	var notOnce int
	if err := conn.QueryRow(t.Context(), "select count(*) from items where n <> 1").Scan(&notOnce); err != nil || notOnce != 0 {
		t.Fatalf("%d rows not visited exactly once (%v)", notOnce, err)
	}
	st = statusOf(t, vars)
	if st[1].State != migrator.StateDone || st[1].Progress != nil {
		t.Fatalf("done lane: %+v", st[1])
	}
	// status --json: progress is null once nothing runs.
	r := runCLI(t, vars, "status", "--json")
	var raw struct {
		Lanes []map[string]json.RawMessage `json:"lanes"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &raw); err != nil || string(raw.Lanes[1]["progress"]) != "null" {
		t.Fatalf("status --json: %s", r)
	}
}

func TestBatchVariables(t *testing.T) {
	t.Parallel()
	e, _, _ := testEnv(map[string]string{"LANES_BATCH_TARGET": "50ms", "LANES_BATCH_PAUSE": "10ms", "LANES_MAX_REPLICATION_LAG": "off", "LANES_BATCH_NICE_RATIO": "0.5"})
	c := &command{env: e}
	bc, err := c.batchConfig()
	if err != nil || bc.Target != 50*time.Millisecond || bc.Pause != 10*time.Millisecond || bc.MaxReplicationLag != -1 || bc.NiceRatio != 0.5 {
		t.Fatalf("batch config = %+v, %v", bc, err)
	}
	for _, bad := range []map[string]string{{"LANES_BATCH_TARGET": "fast"}, {"LANES_BATCH_NICE_RATIO": "-1"}, {"LANES_MAX_REPLICATION_LAG": "-3s"}} {
		e, _, _ := testEnv(bad)
		if _, err := (&command{env: e}).batchConfig(); err == nil {
			t.Fatalf("%v accepted", bad)
		}
	}
}

// TestStatusWatchRedrawsFromNotifications runs status --watch while a batched migration runs
// elsewhere: the table is redrawn with the announced progress.
func TestStatusWatchRedrawsFromNotifications(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{
		"fast/001_items.sql": "create table items (id int4 primary key, n int not null default 0); insert into items (id) select generate_series(1, 400); analyze items;",
		"slow/001_visit.sql": "---- lanes: batch table=items key=id size=10 ----\nupdate items set n = n + 1 where id > $1 and id <= $2 and (select pg_sleep(0.05)) is not null;",
	})
	vars["LANES_BATCH_TARGET"] = "50ms"
	if r := runCLI(t, vars, "migrate", "--lane", "fast"); r.code != ExitOK {
		t.Fatal(r)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	e, stdout, _ := testEnv(vars)
	watchDone := make(chan int, 1)
	go func() { watchDone <- run(ctx, []string{"status", "--watch"}, e) }()
	waitFor(t, stdout, regexp.MustCompile(`slow\s+background\s+0\s+1\s+pending`))
	if r := runCLI(t, vars, "migrate", "--lane", "slow"); r.code != ExitOK {
		t.Fatal(r)
	}
	waitFor(t, stdout, regexp.MustCompile(`slow\s+background\s+1\s+1\s+done`))
	cancel()
	if code := <-watchDone; code != ExitOK {
		t.Fatalf("status --watch exited %d", code)
	}
	if !regexp.MustCompile(`slow\s+background\s+0\s+1\s+running\s+yes\s+\d+\.\d%`).MatchString(stdout.String()) {
		t.Fatalf("no progress drawn:\n%s", stdout.String())
	}
}

func waitFor(t *testing.T, b *logbuf.Buffer, re *regexp.Regexp) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !re.MatchString(b.String()) {
		if time.Now().After(deadline) {
			t.Fatalf("%s not written within 30s:\n%s", re, b.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
