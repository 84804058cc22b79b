package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

func TestMain(m *testing.M) { pgtest.RunMain(m) }

// testEnv returns an environment whose variables are vars only, with captured output.
func testEnv(vars map[string]string) (*env, *logbuf.Buffer, *logbuf.Buffer) {
	stdout, stderr := &logbuf.Buffer{}, &logbuf.Buffer{}
	e := &env{
		stdout: stdout,
		stderr: stderr,
		getenv: func(k string) string { return vars[k] },
		now:    time.Now,
		demo:   defaultDemoOptions(),
	}
	return e, stdout, stderr
}

type result struct {
	code           int
	stdout, stderr string
}

// runCLI runs the command line to completion, bounded by a minute.
func runCLI(t *testing.T, vars map[string]string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	e, stdout, stderr := testEnv(vars)
	code := run(ctx, args, e)
	return result{code: code, stdout: stdout.String(), stderr: stderr.String()}
}

func (r result) String() string {
	return "exit " + strconv.Itoa(r.code) + "\nstdout:\n" + r.stdout + "\nstderr:\n" + r.stderr
}

// dbVars returns the environment of a command run against a fresh database and the lanes in
// files.
func dbVars(t *testing.T, files map[string]string) map[string]string {
	t.Helper()
	return map[string]string{
		"DATABASE_URL":     pgtest.NewDB(t),
		"LANES_MIGRATIONS": testkit.WriteTree(t, files),
		"LANES_LOG_FORMAT": "json",
	}
}

func statusOf(t *testing.T, vars map[string]string) []migrator.LaneStatus {
	t.Helper()
	res := runCLI(t, vars, "status", "--json")
	if res.code != ExitOK {
		t.Fatalf("status --json: %v", res)
	}
	var st struct {
		Lanes []migrator.LaneStatus `json:"lanes"`
	}
	if err := json.Unmarshal([]byte(res.stdout), &st); err != nil {
		t.Fatalf("status --json is not JSON: %v\n%s", err, res.stdout)
	}
	return st.Lanes
}

func TestHelp(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
		res := runCLI(t, nil, args...)
		if res.code != ExitOK {
			t.Errorf("%q: %v", args, res)
		}
		for _, want := range []string{"migrate", "status", "wait", "new", "serve", "demo",
			"DATABASE_URL", "LANES_MIGRATIONS", "LANES_LOG_FORMAT", "LANES_LANES", "LANES_CHANNEL", "LANES_ADDR",
			"LANES_TAKEOVER_INTERVAL", "LANES_PING_INTERVAL", "LANES_POLL_INTERVAL", "LANES_RELISTEN_INTERVAL",
			"LANES_DIRECT_URL", "LANES_POOL_MODE", "name:mode[:version_table]", "Exit codes", "3  wait: --timeout expired"} {
			if !strings.Contains(res.stdout, want) {
				t.Errorf("%q: usage does not mention %q", args, want)
			}
		}
	}
	// Each command's help is its own: its synopsis and its flags, generated from its flag set,
	// and none of the other commands' flags.
	for _, tc := range []struct {
		args    []string
		want    []string
		notWant []string
	}{
		{[]string{"migrate", "--help"}, []string{"Usage: lanes migrate", "--lane LANE", "--allow-drift", "--timeout DURATION"}, []string{"--version VERSION", "--addr", "--json"}},
		{[]string{"wait", "-h"}, []string{"Usage: lanes wait", "--lane LANE", "--timeout DURATION", "--version VERSION"}, []string{"--allow-drift", "--addr"}},
		{[]string{"help", "status"}, []string{"Usage: lanes status", "--json", "--timeout DURATION"}, []string{"--lane LANE", "--addr"}},
		{[]string{"serve", "--help"}, []string{"Usage: lanes serve", "--addr ADDRESS", "LANES_ADDR", "/readyz"}, []string{"--lane LANE", "--json"}},
		{[]string{"new", "--help"}, []string{"Usage: lanes new --lane NAME TITLE", "--lane LANE"}, []string{"--json"}},
	} {
		res := runCLI(t, nil, tc.args...)
		if res.code != ExitOK {
			t.Errorf("%q: %v", tc.args, res)
		}
		for _, w := range tc.want {
			if !strings.Contains(res.stdout, w) {
				t.Errorf("%q: help does not mention %q:\n%s", tc.args, w, res.stdout)
			}
		}
		for _, w := range tc.notWant {
			if strings.Contains(res.stdout, w) {
				t.Errorf("%q: help mentions %q, another command's flag:\n%s", tc.args, w, res.stdout)
			}
		}
	}
	res := runCLI(t, nil, "--version")
	if res.code != ExitOK || !strings.HasPrefix(res.stdout, "lanes ") || !strings.Contains(res.stdout, "go1.") {
		t.Errorf("--version: %v", res)
	}
}

func TestBadDurationNamesTheFlagAndAnExample(t *testing.T) {
	t.Parallel()
	res := runCLI(t, map[string]string{"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none"}, "wait", "--lane", "fast", "--timeout", "5")
	if res.code != ExitUsage || !strings.Contains(res.stderr, "-timeout") || !strings.Contains(res.stderr, "use a unit, such as 5s") {
		t.Errorf("wait --timeout 5: %v", res)
	}
}

func TestUsageErrors(t *testing.T) {
	t.Parallel()
	dir := testkit.WriteTree(t, map[string]string{"fast/001_a.sql": "select 1;", "slow/001_b.sql": "select 1;"})
	vars := map[string]string{"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none", "LANES_MIGRATIONS": dir}
	for _, args := range [][]string{
		{},
		{"bogus"},
		{"--bogus", "status"},
		{"status", "--bogus"},
		{"--log-format", "xml", "status"},
		{"--lanes", "fast:sometimes", "status"},
		{"migrate", "extra"},
		{"migrate", "--lane", "nope"},
		{"wait"},
		{"wait", "--lane", "nope"},
		{"wait", "--lane", "fast", "--version", "-5"},
		{"wait", "--lane", "fast", "--timeout", "soon"},
		{"new", "--lane", "fast"},
		{"new", "title"},
		{"new", "--lane", "nope", "title"},
	} {
		res := runCLI(t, vars, args...)
		if res.code != ExitUsage {
			t.Errorf("%q: want exit %d, got %v", args, ExitUsage, res)
		}
		if !strings.Contains(res.stderr, "--help' for usage") {
			t.Errorf("%q: stderr does not point to --help: %q", args, res.stderr)
		}
	}
}

func TestBadDatabaseURLNeverPrintsThePassword(t *testing.T) {
	t.Parallel()
	dir := testkit.WriteTree(t, map[string]string{"fast/001_a.sql": "select 1;", "slow/001_b.sql": "select 1;"})
	urls := []string{
		"postgres://u:s3cr3t@127.0.0.1:notaport/db",
		"postgres://u:s3cr3t@[::1/db",
		"postgres://u:s3cr3t@127.0.0.1:1/db",
		"postgresql://u:s3cr3t@127.0.0.1:1/db?sslmode=disable",
		"postgres://u:s3%63r3t@127.0.0.1:1/db",
		"host=127.0.0.1 port=abc password=s3cr3t",
		"host=127.0.0.1 port=1 password='s3cr3t' user=u",
	}
	for _, u := range urls {
		_, parseErr := pgx.ParseConfig(u)
		for _, args := range [][]string{{"status", "--timeout", "200ms"}, {"migrate", "--timeout", "200ms"}, {"wait", "--lane", "fast", "--timeout", "200ms"}, {"demo"}, {"serve", "--addr", "127.0.0.1:0"}} {
			// A URL that does not parse is bad configuration; a refused port is no usable
			// database, once the one-shot commands have retried for their --timeout.
			want := ExitError
			if parseErr == nil && args[0] == "serve" {
				continue // serve keeps trying while no server answers (TestServeWaitsForAPrimary)
			}
			if parseErr == nil && args[0] != "demo" {
				want = ExitNoDatabase
			}
			for _, format := range []string{"json", "console"} {
				// Both ways of giving the URL: the environment variable and the flag.
				viaEnv := runCLI(t, map[string]string{"DATABASE_URL": u, "LANES_MIGRATIONS": dir, "LANES_LOG_FORMAT": format}, args...)
				viaFlag := runCLI(t, map[string]string{"LANES_MIGRATIONS": dir, "LANES_LOG_FORMAT": format}, append([]string{"--database-url", u}, args...)...)
				for _, res := range []result{viaEnv, viaFlag} {
					if res.code != want {
						t.Errorf("%s %q: want exit %d, got %v", u, args, want, res)
					}
					if strings.Contains(res.stdout+res.stderr, "s3cr3t") {
						t.Errorf("%s %q: the password was printed:\n%v", u, args, res)
					}
					if !strings.Contains(res.stderr, "127.0.0.1") && !strings.Contains(res.stderr, "database URL") {
						t.Errorf("%s %q: the error does not say which server or that the URL is bad:\n%v", u, args, res)
					}
				}
			}
		}
	}
}

func TestRedact(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ url, msg string }{
		{"postgres://u:s3cr3t@h/db", `parse "postgres://u:s3cr3t@h/db": bad`},
		{"postgres://u:s3cr3t@h/db", "the password is s3cr3t"},
		{"postgres://u:s3%63r3t@h/db", "the password is s3cr3t or s3%63r3t"},
		{"host=h password=s3cr3t", "cannot parse host=h password=s3cr3t"},
		{"host=h password='s3 cr3t'", "cannot parse host=h password='s3 cr3t'"},
		{"", "postgres://x:s3cr3t@h/db and password=s3cr3t"},
	} {
		got := redact(tc.msg, tc.url)
		if strings.Contains(got, "s3") {
			t.Errorf("redact(%q, %q) = %q", tc.msg, tc.url, got)
		}
	}
}

func TestMigrateStatusWait(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{
		"fast/001_create.sql":   "create table things (id int primary key);",
		"fast/002_populate.sql": "insert into things values (1), (2);",
		"slow/001_index.sql":    "create index things_id_idx on things (id);",
	})

	before := statusOf(t, vars)
	if len(before) != 2 || before[0].Name != "fast" || before[1].Name != "slow" ||
		before[0].State != migrator.StatePending || before[0].Version != 0 || before[0].Latest != 2 {
		t.Fatalf("status before migrate: %+v", before)
	}
	table := runCLI(t, vars, "status")
	if table.code != ExitOK || !strings.Contains(table.stdout, "LANE") || !strings.Contains(table.stdout, "pending") {
		t.Fatalf("status: %v", table)
	}

	res := runCLI(t, vars, "migrate")
	if res.code != ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	for _, want := range []string{"OK   001_create.sql", "OK   002_populate.sql", "OK   001_index.sql"} {
		if !strings.Contains(res.stderr, want) {
			t.Errorf("migrate did not log %q:\n%s", want, res.stderr)
		}
	}
	after := statusOf(t, vars)
	for _, l := range after {
		if l.Version != l.Latest || l.State != migrator.StateDone || l.Error != "" {
			t.Errorf("after migrate: %+v", l)
		}
	}
	if res := runCLI(t, vars, "migrate"); res.code != ExitOK || !strings.Contains(res.stderr, "already up to date") {
		t.Errorf("second migrate: %v", res)
	}

	if res := runCLI(t, vars, "wait", "--lane", "slow", "--timeout", "10s"); res.code != ExitOK {
		t.Errorf("wait on a finished lane: %v", res)
	}
	if res := runCLI(t, vars, "wait", "--lane", "fast", "--version", "1"); res.code != ExitOK {
		t.Errorf("wait for a version already passed: %v", res)
	}
	res = runCLI(t, vars, "wait", "--lane", "slow", "--version", "99", "--timeout", "300ms")
	if res.code != ExitTimeout || !strings.Contains(res.stderr, "timed out") {
		t.Errorf("wait for a version never applied: want exit %d, got %v", ExitTimeout, res)
	}
}

func TestMigrateOnlyNamedLanes(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{
		"fast/001_a.sql":    "create table a (i int);",
		"slow/001_b.sql":    "create table b (i int);",
		"reports/001_c.sql": "create table c (i int);",
	})
	vars["LANES_LANES"] = "fast:blocking,reports:background,slow:background"
	if res := runCLI(t, vars, "migrate", "--lane", "slow", "--lane", "fast"); res.code != ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	st := statusOf(t, vars)
	got := map[string]int32{}
	var names []string
	for _, l := range st {
		got[l.Name] = l.Version
		names = append(names, l.Name)
	}
	if strings.Join(names, ",") != "fast,reports,slow" || got["fast"] != 1 || got["slow"] != 1 || got["reports"] != 0 {
		t.Errorf("after migrate --lane slow --lane fast: %+v", st)
	}
}

func TestMigrateFailureThenWaitReportsIt(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{
		"fast/001_a.sql": "create table a (i int);",
		"slow/001_b.sql": "create table b (i int);\n\nselect 1/0;\n",
	})
	res := runCLI(t, vars, "migrate")
	if res.code != ExitError {
		t.Fatalf("migrate with a failing file: want exit %d, got %v", ExitError, res)
	}
	for _, want := range []string{`lane \"slow\"`, "001_b.sql", "select 1/0", "division by zero"} {
		if !strings.Contains(res.stderr, want) {
			t.Errorf("the error does not name %q:\n%s", want, res.stderr)
		}
	}
	st := statusOf(t, vars)
	if st[0].State != migrator.StateDone || st[1].State != migrator.StateFailed || !strings.Contains(st[1].Error, "division by zero") {
		t.Errorf("status after the failure: %+v", st)
	}
	res = runCLI(t, vars, "wait", "--lane", "slow", "--timeout", "20s")
	if res.code != ExitError || !strings.Contains(res.stderr, "division by zero") {
		t.Errorf("wait on a lane with a recorded failure: want exit %d naming the error, got %v", ExitError, res)
	}
	// Waiting for a version before the failure is fine.
	if res := runCLI(t, vars, "wait", "--lane", "slow", "--version", "0"); res.code != ExitOK {
		t.Errorf("wait --version 0: %v", res)
	}
}

func TestWaitLearnsThroughNotify(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{
		"fast/001_a.sql": "create table a (i int);",
		"slow/001_b.sql": "create table b (i int);",
		"slow/002_c.sql": "create table c (i int);",
	})
	if res := runCLI(t, vars, "migrate", "--lane", "fast"); res.code != ExitOK {
		t.Fatalf("migrate --lane fast: %v", res)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	e, _, stderr := testEnv(vars)
	done := make(chan int, 1)
	go func() { done <- run(ctx, []string{"wait", "--lane", "slow", "--timeout", "50s"}, e) }()

	// Once wait says it is listening, the only way it can learn of the lane is a notification.
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(stderr.String(), "waiting for the lane through LISTEN/NOTIFY") {
		select {
		case code := <-done:
			t.Fatalf("wait returned %d before the lane was applied:\n%s", code, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			cancel()
			<-done
			t.Fatalf("wait never started listening:\n%s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if res := runCLI(t, vars, "migrate", "--lane", "slow"); res.code != ExitOK {
		cancel()
		<-done
		t.Fatalf("migrate --lane slow: %v", res)
	}
	if code := <-done; code != ExitOK {
		t.Fatalf("wait: exit %d\n%s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), "lane reached the version") {
		t.Errorf("wait did not say the lane reached the version:\n%s", stderr.String())
	}
}

// TestWaitTrustsOnlyTheLaneHolder: `lanes wait` believes, without a read, the version announced
// by the backend that holds the lane's lock (PostgreSQL names the sending backend; no client can
// forge that), and only that. A well-formed "done" payload sent by another session while the
// lane runs changes nothing (wait reads the status, finds the lane pending and goes on waiting);
// the same payload sent by the holder's own session ends the wait at once, although the version
// table was not touched: it was trusted, not read.
func TestWaitTrustsOnlyTheLaneHolder(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{
		"fast/001_a.sql": "create table a (i int);",
		"slow/001_b.sql": "create table b (i int);",
	})
	if res := runCLI(t, vars, "migrate", "--lane", "fast"); res.code != ExitOK {
		t.Fatalf("migrate --lane fast: %v", res)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	holder, err := pgx.Connect(ctx, vars["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(context.Background())
	lockLane(t, holder, vars, "slow")
	e, _, stderr := testEnv(vars)
	done := make(chan int, 1)
	go func() { done <- run(ctx, []string{"wait", "--lane", "slow", "--timeout", "50s"}, e) }()
	testkit.Eventually(t, "wait listening", 30*time.Second, func() bool {
		return strings.Contains(stderr.String(), "waiting for the lane through LISTEN/NOTIFY")
	})
	payload := `{"lane":"slow","version":1,"state":"done","file":"001_b.sql"}`
	spoofer := pgtest.Connect(t, vars["DATABASE_URL"])
	var sent time.Time
	if err := spoofer.QueryRow(ctx, "select now() from (select pg_notify('lanes_done', $1)) n", payload).Scan(&sent); err != nil {
		t.Fatal(err)
	}
	// The spoofed payload makes wait read the status (the lane still at 0) and go on: its
	// listener's session runs a query other than a ping after the spoof was sent. Trusted, it
	// would run none and exit.
	testkit.Eventually(t, "wait reads the status after the spoofed payload", 30*time.Second, func() bool {
		select {
		case code := <-done:
			t.Fatalf("wait ended on another session's payload: exit %d\n%s", code, stderr.String())
		default:
		}
		return pgtest.Scalar[bool](t, spoofer, `select exists (select 1 from pg_stat_activity where datname = current_database()
  and pid not in (pg_backend_pid(), $1) and application_name like 'lanes/%' and query_start > $2 and query not like '-- ping%' and state = 'idle')`,
			int32(holder.PgConn().PID()), sent)
	})
	select {
	case code := <-done:
		t.Fatalf("wait ended on another session's payload: exit %d\n%s", code, stderr.String())
	default:
	}
	if _, err := holder.Exec(ctx, "select pg_notify('lanes_done', $1)", payload); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-done:
		if code != ExitOK {
			t.Fatalf("wait: exit %d\n%s", code, stderr.String())
		}
	case <-ctx.Done():
		t.Fatalf("wait did not believe the holder's notification:\n%s", stderr.String())
	}
	if !pgtest.Scalar[bool](t, spoofer, "select to_regclass('lanes_slow_version') is null") {
		t.Fatal("the slow lane's version table exists; the test needs it untouched")
	}
}

// lockLane takes the lock of lane (of the migrations in vars) on conn, as an applier holds it,
// and returns its key.
func lockLane(t *testing.T, conn *pgx.Conn, vars map[string]string, lane string) int64 {
	t.Helper()
	lanes, err := migrator.LanesFromFS(os.DirFS(vars["LANES_MIGRATIONS"]), nil)
	if err != nil {
		t.Fatal(err)
	}
	m, err := migrator.New(conn.Config(), lanes, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	key, err := m.LockKey(t.Context(), conn, lane)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(t.Context(), "select pg_advisory_lock($1)", key); err != nil {
		t.Fatal(err)
	}
	return key
}

func TestWaitDoesNotApply(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{"fast/001_a.sql": "create table a (i int);", "slow/001_b.sql": "create table b (i int);"})
	if res := runCLI(t, vars, "wait", "--lane", "fast", "--timeout", "500ms"); res.code != ExitTimeout {
		t.Fatalf("wait on a pending lane: want exit %d, got %v", ExitTimeout, res)
	}
	conn, err := pgx.Connect(t.Context(), vars["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var exists bool
	if err := conn.QueryRow(t.Context(), "select to_regclass('a') is not null").Scan(&exists); err != nil {
		t.Fatal(err)
	}
	if exists {
		t.Error("wait applied a migration")
	}
}

func TestNew(t *testing.T) {
	t.Parallel()
	dir := testkit.WriteTree(t, map[string]string{
		"fast/001_a.sql":  "create table a (i int);",
		"fast/002_b.sql":  "create table b (i int);",
		"slow/0001_c.sql": "create table c (i int);",
	})
	vars := map[string]string{"LANES_MIGRATIONS": dir, "LANES_LOG_FORMAT": "json"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"new", "--lane", "fast", "Add Things!"}, "fast/003_add_things.sql"},
		{[]string{"new", "--lane", "fast", "more", "words", "here"}, "fast/004_more_words_here.sql"},
		{[]string{"new", "--lane", "slow", "wide"}, "slow/0002_wide.sql"},
		{[]string{"new", "--lane", "reports", "--lanes", "fast,slow,reports:background", "first"}, "reports/001_first.sql"},
	} {
		res := runCLI(t, vars, tc.args...)
		want := filepath.Join(dir, filepath.FromSlash(tc.want))
		if res.code != ExitOK || strings.TrimSpace(res.stdout) != want {
			t.Errorf("%q: want %s, got %v", tc.args, want, res)
			continue
		}
		b, err := os.ReadFile(want)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), "\n---- create above / drop below ----\n") || strings.Contains(string(b), "{{") {
			t.Errorf("%s is not the template:\n%s", want, b)
		}
	}
	if res := runCLI(t, vars, "new", "--lane", "fast", "!!!"); res.code != ExitUsage {
		t.Errorf("a title without letters: %v", res)
	}
	if res := runCLI(t, map[string]string{}, "new", "--lane", "fast", "x"); res.code != ExitUsage || !strings.Contains(res.stderr, "LANES_MIGRATIONS") {
		t.Errorf("new without a migrations folder: %v", res)
	}
	if res := runCLI(t, map[string]string{"LANES_MIGRATIONS": filepath.Join(dir, "missing")}, "new", "--lane", "fast", "x"); res.code != ExitError {
		t.Errorf("new with a missing migrations folder: %v", res)
	}
}

func TestGlobalFlagsOverrideEnvironment(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{"fast/001_a.sql": "create table a (i int);", "slow/001_b.sql": "create table b (i int);"})
	flags := []string{"--database-url", vars["DATABASE_URL"], "--migrations", vars["LANES_MIGRATIONS"], "--log-format", "console"}
	env := map[string]string{"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none", "LANES_MIGRATIONS": "/nonexistent", "LANES_LOG_FORMAT": "xml"}
	if res := runCLI(t, env, append(flags, "migrate")...); res.code != ExitOK {
		t.Fatalf("migrate with global flags: %v", res)
	}
	// Global flags after the command work too.
	if res := runCLI(t, env, append([]string{"status", "--json"}, flags...)...); res.code != ExitOK || !strings.Contains(res.stdout, `"lanes"`) {
		t.Fatalf("status with global flags after the command: %v", res)
	}
}

func TestTuningVariables(t *testing.T) {
	t.Parallel()
	dir := testkit.WriteTree(t, map[string]string{"fast/001_a.sql": "select 1;", "slow/001_b.sql": "select 1;"})
	for _, name := range []string{"LANES_TAKEOVER_INTERVAL", "LANES_PING_INTERVAL", "LANES_POLL_INTERVAL", "LANES_RELISTEN_INTERVAL"} {
		for _, bad := range []string{"soon", "-1s", "5"} {
			vars := map[string]string{"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none", "LANES_MIGRATIONS": dir, name: bad}
			for _, args := range [][]string{{"serve", "--addr", "127.0.0.1:0"}, {"wait", "--lane", "slow"}} {
				if res := runCLI(t, vars, args...); res.code != ExitUsage || !strings.Contains(res.stderr, name) {
					t.Errorf("%s=%q %q: want exit %d naming the variable, got %v", name, bad, args, ExitUsage, res)
				}
			}
		}
	}
	set := map[string]string{"LANES_TAKEOVER_INTERVAL": "250ms", "LANES_PING_INTERVAL": " 1s ", "LANES_POLL_INTERVAL": "0", "LANES_RELISTEN_INTERVAL": "2m"}
	c := &command{env: &env{getenv: func(k string) string { return set[k] }}}
	tu, err := c.tuning()
	if err != nil || tu != (tuning{takeover: 250 * time.Millisecond, ping: time.Second, relisten: 2 * time.Minute}) {
		t.Fatalf("tuning = %+v, %v", tu, err)
	}
}

func TestResolveSettings(t *testing.T) {
	t.Parallel()
	environ := map[string]string{"DATABASE_URL": "postgres:///fromenv", "LANES_MIGRATIONS": "/env", "LANES_LOG_FORMAT": "console"}
	g := globals{databaseURL: "", migrations: "/flag"}
	// A flag given explicitly wins even when empty: --database-url "" means libpq defaults.
	s, err := g.resolve(func(k string) string { return environ[k] }, map[string]bool{"database-url": true, "migrations": true}, false)
	if err != nil {
		t.Fatal(err)
	}
	if s.databaseURL != "" || s.migrations != "/flag" || s.logFormat != "console" || s.channel != migrator.DefaultChannel {
		t.Errorf("resolve: %+v", s)
	}
	for _, terminal := range []bool{false, true} {
		s, err := (&globals{}).resolve(func(string) string { return "" }, nil, terminal)
		want := map[bool]string{false: "json", true: "console"}[terminal]
		if err != nil || s.logFormat != want {
			t.Errorf("default log format on a terminal=%v: %q %v", terminal, s.logFormat, err)
		}
	}
}

func TestChannelFlag(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{"fast/001_a.sql": "create table a (i int);", "slow/001_b.sql": "create table b (i int);"})
	vars["LANES_CHANNEL"] = "my_channel"
	if res := runCLI(t, vars, "migrate", "--lane", "fast"); res.code != ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, vars["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "listen my_channel"); err != nil {
		t.Fatal(err)
	}
	if res := runCLI(t, vars, "migrate", "--lane", "slow"); res.code != ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	n, err := conn.WaitForNotification(ctx)
	if err != nil {
		t.Fatalf("no notification on my_channel: %v", err)
	}
	if ev, err := wire.Parse(n.Payload); err != nil || ev.Lane != "slow" {
		t.Errorf("notification %q: %+v %v", n.Payload, ev, err)
	}
}

// Only demo uses the embedded demo migrations: every other command without --migrations or
// LANES_MIGRATIONS is a usage error that names both and touches nothing (no connection, no
// table, no HTTP listener). Before, migrate applied the demo lanes to the user's database.
func TestNoAccidentalDemo(t *testing.T) {
	t.Parallel()
	// A server that only counts who connects to it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	counting := "postgres://nobody@" + ln.Addr().String() + "/none?sslmode=disable&connect_timeout=2"
	real := pgtest.NewDB(t)
	for _, args := range [][]string{
		{"migrate"},
		{"migrate", "--lane", "fast"},
		{"status"},
		{"status", "--json"},
		{"wait", "--lane", "fast", "--timeout", "2s"},
		{"serve", "--addr", "127.0.0.1:0"},
	} {
		for _, url := range []string{counting, real} {
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			e, stdout, stderr := testEnv(map[string]string{"DATABASE_URL": url, "LANES_LOG_FORMAT": "json"})
			listened := false
			e.onListen = func(net.Addr) { listened = true }
			code := run(ctx, args, e)
			cancel()
			res := result{code: code, stdout: stdout.String(), stderr: stderr.String()}
			if res.code != ExitUsage || !strings.Contains(res.stderr, "--migrations") || !strings.Contains(res.stderr, "LANES_MIGRATIONS") {
				t.Errorf("%q without a migrations folder: want exit %d naming --migrations and LANES_MIGRATIONS, got %v", args, ExitUsage, res)
			}
			if listened {
				t.Errorf("%q without a migrations folder bound its HTTP listener", args)
			}
		}
	}
	if n := accepted.Load(); n != 0 {
		t.Errorf("%d connections were made to the database without a migrations folder", n)
	}
	conn, err := pgx.Connect(t.Context(), real)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var tables []string
	rows, err := conn.Query(t.Context(), "select schemaname || '.' || tablename from pg_tables where schemaname not in ('pg_catalog', 'information_schema')")
	if err != nil {
		t.Fatal(err)
	}
	if tables, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		t.Fatal(err)
	}
	if len(tables) > 0 {
		t.Errorf("tables created without a migrations folder: %v", tables)
	}
}

func TestMigrateRefusesDriftUnlessAllowed(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{"fast/001_a.sql": "create table a (i int);", "slow/001_b.sql": "create table b (i int);"})
	if res := runCLI(t, vars, "migrate"); res.code != ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	dir := vars["LANES_MIGRATIONS"]
	if err := os.WriteFile(filepath.Join(dir, "fast", "001_a.sql"), []byte("create table a (i bigint);"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "fast", "002_c.sql"), []byte("create table c (i int);"), 0o644); err != nil {
		t.Fatal(err)
	}
	if res := runCLI(t, vars, "migrate"); res.code != ExitError || !strings.Contains(res.stderr, "001_a.sql") {
		t.Errorf("migrate after an applied file changed: want exit %d naming the file, got %v", ExitError, res)
	}
	st := statusOf(t, vars)
	if len(st[0].Drift) != 1 || st[0].Drift[0] != "001_a.sql" {
		t.Errorf("status does not report the drift: %+v", st[0])
	}
	if res := runCLI(t, vars, "status"); res.code != ExitOK || !strings.Contains(res.stdout, "changed since applied: 001_a.sql") {
		t.Errorf("status table does not report the drift: %v", res)
	}
	if res := runCLI(t, vars, "migrate", "--allow-drift"); res.code != ExitOK || !strings.Contains(res.stderr, "OK   002_c.sql") {
		t.Errorf("migrate --allow-drift: %v", res)
	}
}

// Durations are seconds in JSON ("duration_s") and carry their unit on the console.
func TestLogDurationsHaveUnits(t *testing.T) {
	t.Parallel()
	files := map[string]string{"fast/001_create.sql": "create table things (id int primary key);"}
	vars := dbVars(t, files)
	res := runCLI(t, vars, "migrate")
	if res.code != ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	var ok map[string]any
	for _, line := range strings.Split(strings.TrimSpace(res.stderr), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("a JSON log line is not JSON: %q", line)
		}
		if m["file"] == "001_create.sql" {
			ok = m
		}
	}
	if secs, isNum := ok["duration_s"].(float64); !isNum || secs <= 0 || secs > 60 || ok["duration"] != nil {
		t.Errorf("the OK line in JSON: want duration_s in seconds, got %v", ok)
	}

	vars = dbVars(t, files)
	vars["LANES_LOG_FORMAT"] = "console"
	res = runCLI(t, vars, "migrate")
	if res.code != ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	if !regexp.MustCompile(`OK   001_create\.sql .*duration=[0-9.]+(µs|ms|s)\b`).MatchString(res.stderr) {
		t.Errorf("the OK line on the console: want duration=<number><unit>:\n%s", res.stderr)
	}
	if strings.Contains(res.stderr, "duration_s") {
		t.Errorf("the console shows a raw seconds field:\n%s", res.stderr)
	}
}

func TestDurationsWithUnits(t *testing.T) {
	for in, want := range map[float64]string{0.0123456: "12.35ms", 2.5: "2.5s", 0.000042: "42µs", 125.4: "2m5s"} {
		f := map[string]any{"took_s": json.Number(strconv.FormatFloat(in, 'f', -1, 64)), "count_s": "x"}
		if err := durationsWithUnits(f); err != nil {
			t.Fatal(err)
		}
		if f["took"] != want || f["count_s"] != "x" {
			t.Errorf("%v seconds: got %v, want took=%s", in, f, want)
		}
	}
}

// A lane folder kept in git by a .gitkeep only is an empty lane: done at version 0, not an error.
func TestGitkeepFolderIsAnEmptyLane(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{
		"fast/001_create.sql": "create table things (id int primary key);",
		"slow/.gitkeep":       "",
	})
	if res := runCLI(t, vars, "migrate"); res.code != ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	lanes := statusOf(t, vars)
	if len(lanes) != 2 || lanes[1].Name != "slow" || lanes[1].Latest != 0 || lanes[1].Version != 0 || lanes[1].State != migrator.StateDone {
		t.Fatalf("status: %+v", lanes)
	}
	if res := runCLI(t, vars, "wait", "--lane", "slow", "--timeout", "10s"); res.code != ExitOK {
		t.Fatalf("wait on an empty lane: %v", res)
	}
}

// A refused connection is said once, although pgx tries twice (TLS, then plain).
func TestConnectionErrorSaidOnce(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	vars := map[string]string{
		"DATABASE_URL":     fmt.Sprintf("postgres://u:secret@127.0.0.1:%d/db?connect_timeout=5", port),
		"LANES_MIGRATIONS": testkit.WriteTree(t, map[string]string{"fast/001_a.sql": "select 1;"}),
		"LANES_LOG_FORMAT": "console",
	}
	// --timeout 0s: no retry (a retry would say the refusal again in its warning).
	res := runCLI(t, vars, "status", "--timeout", "0s")
	if res.code == ExitOK || strings.Count(res.stderr, "connection refused") != 1 || strings.Contains(res.stderr, "secret") {
		t.Errorf("want one refusal, no password: %v", res)
	}
}

// The stock binary on the repository's own migrations/ folder, whose slow lane starts with a Go
// migration (version 1, no file), says which version is missing and that it is probably a Go
// migration needing a binary built with lanescli; it connects to nothing. Before, it said only
// "missing migration 1: numbers run from 1 without gaps".
func TestStockBinaryNamesTheMissingGoMigration(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	vars := map[string]string{"DATABASE_URL": "postgres://nobody@" + ln.Addr().String() + "/none?sslmode=disable&connect_timeout=2",
		"LANES_MIGRATIONS": filepath.Join("..", "..", "migrations"), "LANES_LOG_FORMAT": "json"}
	for _, args := range [][]string{{"migrate"}, {"status"}, {"wait", "--lane", "fast"}, {"serve", "--addr", "127.0.0.1:0"}} {
		res := runCLI(t, vars, args...)
		if res.code != ExitError || !strings.Contains(res.stderr, `lane \"slow\": missing migration 1`) ||
			!strings.Contains(res.stderr, "Go migration") || !strings.Contains(res.stderr, "lanescli") {
			t.Errorf("%q on the repository's migrations folder: %v", args, res)
		}
	}
	if n := accepted.Load(); n != 0 {
		t.Errorf("%d connections made", n)
	}
}

// A lane whose applied file was renamed, up to date: migrate exits 1 naming the file and
// --allow-drift; status shows the state drift, or done with --allow-drift (still listing it).
func TestDriftOnAnUpToDateLane(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{"fast/001_a.sql": "create table a (i int);"})
	if res := runCLI(t, vars, "migrate"); res.code != ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	dir := vars["LANES_MIGRATIONS"]
	if err := os.Rename(filepath.Join(dir, "fast", "001_a.sql"), filepath.Join(dir, "fast", "001_renamed.sql")); err != nil {
		t.Fatal(err)
	}
	if res := runCLI(t, vars, "migrate"); res.code != ExitError || !strings.Contains(res.stderr, "001_renamed.sql (applied as 001_a.sql)") || !strings.Contains(res.stderr, "--allow-drift") {
		t.Errorf("migrate of an up-to-date lane with a renamed file: want exit %d naming it and --allow-drift, got %v", ExitError, res)
	}
	if st := statusOf(t, vars); st[0].State != migrator.StateDrift {
		t.Errorf("status: state %s, want drift", st[0].State)
	}
	res := runCLI(t, vars, "status", "--json", "--allow-drift")
	var sj struct{ Lanes []migrator.LaneStatus }
	if res.code != ExitOK || json.Unmarshal([]byte(res.stdout), &sj) != nil || len(sj.Lanes) != 1 || sj.Lanes[0].State != migrator.StateDone || len(sj.Lanes[0].Drift) != 1 {
		t.Errorf("status --allow-drift: want done with the drift listed: %v", res)
	}
	if res := runCLI(t, vars, "migrate", "--allow-drift"); res.code != ExitOK {
		t.Errorf("migrate --allow-drift: %v", res)
	}
}
