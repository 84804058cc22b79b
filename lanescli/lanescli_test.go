package lanescli_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/lanescli"
	"github.com/multilanes/lanes/migrations"
	"github.com/multilanes/lanes/migrator"
)

func TestMain(m *testing.M) { pgtest.RunMain(m) }

type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

func run(t *testing.T, cfg lanescli.Config, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	var stdout, stderr logbuf.Buffer
	code := lanescli.Main(ctx, append([]string{"--log-format", "json"}, args...), &stdout, &stderr, cfg)
	return result{code, stdout.String(), stderr.String()}
}

// repoFuncs returns the Go migrations of the repository's own migrations/ folder (the demo's
// slow lane backfills its rows in a Go migration, version 1, which has no file).
func repoFuncs() map[string][]migrator.GoMigration {
	funcs := map[string][]migrator.GoMigration{}
	for _, l := range migrations.Lanes() {
		if len(l.Funcs) > 0 {
			funcs[l.Name] = l.Funcs
		}
	}
	return funcs
}

func laneStates(t *testing.T, out string) map[string]migrator.LaneStatus {
	t.Helper()
	var st struct {
		Lanes []migrator.LaneStatus `json:"lanes"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	m := map[string]migrator.LaneStatus{}
	for _, l := range st.Lanes {
		m[l.Name] = l
	}
	return m
}

// The repository's own migrations/ folder, whose slow lane starts with a Go migration, works
// with a command line built with its Go migrations registered: migrate, status and wait.
func TestRepositoryMigrationsWithTheirGoMigrations(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDB(t)
	cfg := lanescli.Config{Funcs: repoFuncs()}
	flags := []string{"--database-url", db, "--migrations", "../migrations"}
	if res := run(t, cfg, append(flags, "migrate")...); res.code != lanescli.ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	res := run(t, cfg, append(flags, "status", "--json")...)
	if res.code != lanescli.ExitOK {
		t.Fatalf("status: %v", res)
	}
	st := laneStates(t, res.stdout)
	if !st["fast"].Done() || !st["slow"].Done() || st["slow"].Latest != 2 {
		t.Fatalf("status after migrate: %+v", st)
	}
	if res := run(t, cfg, append(flags, "wait", "--lane", "slow", "--timeout", "30s")...); res.code != lanescli.ExitOK {
		t.Fatalf("wait: %v", res)
	}
	conn, err := pgx.Connect(t.Context(), db)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var loaded int
	if err := conn.QueryRow(t.Context(), "select count(*) from example where loaded").Scan(&loaded); err != nil {
		t.Fatal(err)
	}
	if loaded != 50000 {
		t.Fatalf("the Go migration loaded %d rows, want 50000", loaded)
	}
	// The stock binary (a zero Config) on the same folder says which version is missing and why.
	res = run(t, lanescli.Config{}, append(flags, "status")...)
	if res.code != lanescli.ExitError || !strings.Contains(res.stderr, `lane \"slow\": missing migration 1`) || !strings.Contains(res.stderr, "lanescli") {
		t.Fatalf("stock binary on a lane with a Go migration: %v", res)
	}
}

// A custom binary whose lanes still have a hole says so without pointing at lanescli, and Go
// migrations registered on a lane that is not loaded are refused, not skipped.
func TestRegisteredGoMigrationsAreChecked(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for name, body := range map[string]string{"fast/001_a.sql": "select 1;", "slow/003_c.sql": "select 1;"} {
		if err := os.MkdirAll(dir+"/"+name[:strings.Index(name, "/")], 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dir+"/"+name, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	nop := func(context.Context, pgx.Tx) error { return nil }
	flags := []string{"--database-url", "postgres://nobody@127.0.0.1:1/none", "--migrations", dir}
	gap := lanescli.Config{Funcs: map[string][]migrator.GoMigration{"slow": {{Version: 1, Name: "one", Up: nop}}}}
	res := run(t, gap, append(flags, "status")...)
	if res.code != lanescli.ExitError || !strings.Contains(res.stderr, "missing migration 2") || !strings.Contains(res.stderr, "registered in this binary") {
		t.Errorf("custom binary with a hole: %v", res)
	}
	stray := lanescli.Config{Funcs: map[string][]migrator.GoMigration{"reports": {{Version: 1, Name: "one", Up: nop}}}}
	res = run(t, stray, append(flags, "status")...)
	if res.code != lanescli.ExitError || !strings.Contains(res.stderr, `lane \"reports\"`) {
		t.Errorf("Go migrations on a lane that is not loaded: %v", res)
	}
}

// Lanes built into the binary serve migrate, status and wait without a migrations folder.
func TestBuiltInLanes(t *testing.T) {
	t.Setenv("LANES_MIGRATIONS", "")
	t.Setenv("LANES_LANES", "")
	db := pgtest.NewDB(t)
	cfg := lanescli.Config{Lanes: []migrator.Lane{
		{Name: "fast", Mode: migrator.Blocking, FS: fstest.MapFS{"001_t.sql": {Data: []byte("create table t (i int);")}}},
		{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"002_i.sql": {Data: []byte("insert into t values (2);")}}},
	}, Funcs: map[string][]migrator.GoMigration{"slow": {{Version: 1, Name: "one", Up: func(ctx context.Context, tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "insert into t values (1)")
		return err
	}}}}}
	if res := run(t, cfg, "--database-url", db, "migrate"); res.code != lanescli.ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	if res := run(t, cfg, "--database-url", db, "wait", "--lane", "slow", "--timeout", "10s"); res.code != lanescli.ExitOK {
		t.Fatalf("wait: %v", res)
	}
}

// A binary of your own: the lanes command line with the service's Go migrations registered.
func ExampleMain() {
	backfill := func(ctx context.Context, tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "update items set name = lower(name)")
		return err
	}
	cfg := lanescli.Config{
		// Files in the binary (usually an embed.FS); --migrations DIR would read a folder instead.
		Lanes: []migrator.Lane{
			{Name: "fast", Mode: migrator.Blocking, FS: fstest.MapFS{
				"001_items.sql": {Data: []byte("create table items (id int primary key, name text);")},
			}},
			{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{
				"002_index.sql": {Data: []byte("---- tern: disable-tx ----\ndrop index concurrently if exists items_name;\ncreate index concurrently items_name on items (name);")},
			}},
		},
		// Version 1 of the slow lane is Go code: it has no file.
		Funcs: map[string][]migrator.GoMigration{
			"slow": {{Version: 1, Name: "lower_names", Revision: "1", Up: backfill}},
		},
	}
	// In the binary's main: lanescli.Main(ctx, os.Args[1:], os.Stdout, os.Stderr, cfg).
	ctx := context.Background()
	db := pgtest.ExampleDB()
	migrate := lanescli.Main(ctx, []string{"--database-url", db, "migrate"}, io.Discard, io.Discard, cfg)
	wait := lanescli.Main(ctx, []string{"--database-url", db, "wait", "--lane", "slow", "--timeout", "30s"}, io.Discard, io.Discard, cfg)
	fmt.Println("migrate:", migrate, "wait:", wait)
	// Output: migrate: 0 wait: 0
}
