package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgtest"
)

// logLine is one JSON log line of the demo.
type logLine struct {
	Message  string `json:"message"`
	Level    string `json:"level"`
	Replica  string `json:"replica"`
	Lane     string `json:"lane"`
	Via      string `json:"via"`
	Database string `json:"database"`
	File     string `json:"file"`
	Progress string `json:"slow_lane_progress"`
	Raw      string `json:"-"` // the line as logged, every field
}

func parseLog(t *testing.T, out string) []logLine {
	t.Helper()
	var lines []logLine
	for _, s := range strings.Split(strings.TrimSpace(out), "\n") {
		var l logLine
		if err := json.Unmarshal([]byte(s), &l); err != nil {
			t.Fatalf("not a JSON log line: %q: %v", s, err)
		}
		l.Raw = s
		lines = append(lines, l)
	}
	return lines
}

// shortDemo returns an environment for a demo of replicas replicas and a short slow lane.
func shortDemo(vars map[string]string, replicas int) (*env, *logbuf.Buffer, *logbuf.Buffer) {
	e, stdout, stderr := testEnv(vars)
	e.demo.loadDuration = 1500 * time.Millisecond
	e.demo.replicas = replicas
	e.demo.workInterval = 200 * time.Millisecond
	return e, stdout, stderr
}

// checkStory checks the demo's log: the story lines in order, one replica applying the slow
// lane, every other one learning of its completion through a notification, and the demo
// database dropped. It returns the demo database's name.
func checkStory(t *testing.T, out string, replicas int) string {
	t.Helper()
	lines := parseLog(t, out)
	next := 0
	find := func(pred func(logLine) bool, what string) {
		t.Helper()
		for i := next; i < len(lines); i++ {
			if pred(lines[i]) {
				next = i + 1
				return
			}
		}
		t.Fatalf("the demo's log has no %s after line %d:\n%s", what, next, out)
	}
	msg := func(m string) func(logLine) bool { return func(l logLine) bool { return l.Message == m } }
	find(msg("created a fresh demo database; starting the app's replicas on it"), "created database")
	find(func(l logLine) bool {
		return strings.HasPrefix(l.Message, "OK   001_create_example.sql (") && l.Lane == "fast"
	}, "fast lane's first migration")
	find(func(l logLine) bool { return strings.HasPrefix(l.Message, "OK   002_populate_example.sql (") }, "fast lane's second migration")
	for i := 1; i <= replicas; i++ {
		r := fmt.Sprintf("r%d", i)
		find(func(l logLine) bool {
			return l.Message == "replica ready: the fast lane is applied, the app may serve" && l.Replica == r
		}, r+" ready")
	}
	find(msg("app can do some work while the long-running migrations run in the background"), "work line")
	work := 0
	for _, l := range lines {
		if l.Message == "app can do some work while the long-running migrations run in the background" {
			work++
		}
	}
	if work != 1 {
		t.Errorf("the demo said %d times that the app can work: once, then only what changes", work)
	}
	find(func(l logLine) bool {
		return strings.HasPrefix(l.Message, "OK   002_index_example.sql (") && l.Lane == "slow"
	}, "slow lane's last migration")
	find(msg("background migrations completed"), "completion")
	find(msg("app can fully proceed now that long running migrations are passed"), "full feature")
	find(msg("app exited gracefully"), "graceful exit")
	find(msg("demo database dropped"), "dropped database")

	var applier string
	appliedBy, learned, doneVia := map[string]bool{}, map[string]bool{}, map[string]string{}
	fastApplied := 0
	for _, l := range lines {
		switch {
		case l.Message == "this replica applied the slow lane itself":
			applier = l.Replica
			appliedBy[l.Replica] = true
		case l.Message == "learned through LISTEN/NOTIFY that the slow lane is done, without polling" && l.Via == "notification":
			learned[l.Replica] = true
		case l.Message == "lane done" && l.Lane == "slow":
			doneVia[l.Replica] = l.Via
		case strings.HasPrefix(l.Message, "OK   001_create_example.sql"):
			fastApplied++
		case l.Level == "error" || l.Level == "warn":
			t.Errorf("the demo logged a problem: %s", l.Raw)
		}
	}
	// The backfill's progress reached a replica that does not apply it.
	progressed := false
	for _, l := range lines {
		if l.Message == "every replica sees the backfill's progress, announced by the one applying it" {
			for _, part := range strings.Fields(l.Progress) {
				progressed = progressed || (applier != "" && !strings.HasPrefix(part, applier+"="))
			}
		}
	}
	if replicas > 1 && !progressed {
		t.Errorf("no story line shows the backfill's progress on a replica that does not apply it:\n%s", out)
	}
	if len(appliedBy) != 1 || fastApplied != 1 {
		t.Errorf("want one replica applying each lane; slow: %v, fast applied %d times", appliedBy, fastApplied)
	}
	for i := 1; i <= replicas; i++ {
		r := fmt.Sprintf("r%d", i)
		if r == applier {
			continue
		}
		if !learned[r] || doneVia[r] != "notification" {
			t.Errorf("replica %s did not learn of the slow lane through a notification (learned %v, via %q)", r, learned[r], doneVia[r])
		}
	}
	var db string
	for _, l := range lines {
		if l.Message == "demo database dropped" {
			db = l.Database
		}
	}
	return db
}

func databaseExists(t *testing.T, url, name string) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var exists bool
	if err := conn.QueryRow(ctx, "select exists (select from pg_database where datname = $1)", name).Scan(&exists); err != nil {
		t.Fatal(err)
	}
	return exists
}

func TestDemo(t *testing.T) {
	t.Parallel()
	url := pgtest.NewDB(t)
	e, stdout, stderr := shortDemo(map[string]string{"DATABASE_URL": url, "LANES_LOG_FORMAT": "json"}, 3)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if code := run(ctx, []string{"demo"}, e); code != ExitOK {
		t.Fatalf("demo: exit %d\n%s%s", code, stdout.String(), stderr.String())
	}
	db := checkStory(t, stdout.String(), 3)
	if !strings.HasPrefix(db, "lanes_demo_") || databaseExists(t, url, db) {
		t.Errorf("demo database %q was not dropped", db)
	}
}

// TestDemoThrowawayCluster runs the demo with no DATABASE_URL and a PGHOST where no server
// listens, so that it starts and stops a cluster of its own.
func TestDemoThrowawayCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL cluster")
	}
	if _, err := pgcluster.FindBinaries(); err != nil {
		if os.Getenv("LANES_TEST_REQUIRE_DB") == "1" {
			t.Fatalf("the demo's throwaway cluster needs the PostgreSQL server programs: %v", err)
		}
		t.Skip(err)
	}
	t.Setenv("PGHOST", t.TempDir()) // no server there: libpq defaults fail fast
	e, stdout, stderr := shortDemo(map[string]string{"LANES_LOG_FORMAT": "json"}, 2)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	if code := run(ctx, []string{"demo"}, e); code != ExitOK {
		t.Fatalf("demo: exit %d\n%s%s", code, stdout.String(), stderr.String())
	}
	checkStory(t, stdout.String(), 2)
	out := stdout.String()
	for _, want := range []string{"starting a throwaway PostgreSQL cluster", "throwaway cluster stopped"} {
		if !strings.Contains(out, want) {
			t.Errorf("the demo's log does not say %q:\n%s", want, out)
		}
	}
}

func TestDemoUnreachableDatabaseURL(t *testing.T) {
	t.Parallel()
	res := runCLI(t, map[string]string{"DATABASE_URL": "postgres://demo:s3cr3t@127.0.0.1:1/x"}, "demo")
	if res.code != ExitError || !strings.Contains(res.stderr, "127.0.0.1") || strings.Contains(res.stderr, "s3cr3t") {
		t.Errorf("demo with an unreachable DATABASE_URL: %v", res)
	}
}
