package cli

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

func historyOf(t *testing.T, vars map[string]string, args ...string) []migrator.HistoryEntry {
	t.Helper()
	res := runCLI(t, vars, append([]string{"history", "--json"}, args...)...)
	if res.code != ExitOK {
		t.Fatalf("history --json: %v", res)
	}
	var h historyJSON
	if err := json.Unmarshal([]byte(res.stdout), &h); err != nil {
		t.Fatalf("history --json is not JSON: %v\n%s", err, res.stdout)
	}
	return h.History
}

func TestHistoryAndForce(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{
		"fast/001_a.sql": "create table a (i int);",
		"fast/002_b.sql": "insert into needs_repair values (1);",
		"slow/001_s.sql": "create table s (i int);",
	})
	if res := runCLI(t, vars, "history"); res.code != ExitOK || !strings.Contains(res.stdout, "ID") {
		t.Fatalf("history before any migration: %v", res)
	}
	if res := runCLI(t, vars, "migrate", "--lane", "fast"); res.code != ExitError {
		t.Fatalf("migrate past a bad file: %v", res)
	}
	h := historyOf(t, vars)
	if len(h) != 2 || h[0].Result != migrator.ResultFailed || h[0].Version != 2 || h[0].File != "002_b.sql" ||
		h[0].SQLState != "42P01" || !strings.Contains(h[0].Error, "needs_repair") ||
		h[1].Result != migrator.ResultApplied || h[1].Version != 1 || len(h[1].Checksum) != 64 || h[1].PID == 0 || h[1].Host == "" {
		t.Fatalf("history after a failure: %+v", h)
	}
	res := runCLI(t, vars, "history", "--lane", "fast")
	if res.code != ExitOK || !strings.Contains(res.stdout, "002_b.sql") || !strings.Contains(res.stdout, "failed") || !strings.Contains(res.stdout, "[42P01]") {
		t.Fatalf("history table: %v", res)
	}

	// The operator repairs by hand, then records it. Refused while the lane's lock is held.
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, vars["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "create table needs_repair (i int); insert into needs_repair values (1)"); err != nil {
		t.Fatal(err)
	}
	key := lockLane(t, conn, vars, "fast")
	res = runCLI(t, vars, "force", "--lane", "fast", "--version", "2")
	if res.code != ExitError || !strings.Contains(res.stderr, "holds its lock") || !strings.Contains(res.stderr, "pid ") {
		t.Fatalf("force while the lane is locked: %v", res)
	}
	if st := statusOf(t, vars); st[0].Version != 1 {
		t.Fatalf("force refused but the version moved: %+v", st[0])
	}
	if _, err := conn.Exec(ctx, "select pg_advisory_unlock($1)", key); err != nil {
		t.Fatal(err)
	}
	res = runCLI(t, vars, "force", "--lane", "fast", "--version", "2")
	if res.code != ExitOK || !strings.Contains(res.stdout, "version 1 -> 2") {
		t.Fatalf("force: %v", res)
	}
	st := statusOf(t, vars)
	if st[0].Version != 2 || st[0].State != migrator.StateDone || st[0].Error != "" || len(st[0].Drift) != 0 {
		t.Fatalf("status after force: %+v", st[0])
	}
	h = historyOf(t, vars, "--lane", "fast", "--limit", "1")
	if len(h) != 1 || h[0].Result != migrator.ResultForced || h[0].ForcedFrom == nil || *h[0].ForcedFrom != 1 || h[0].Version != 2 || h[0].File != "002_b.sql" {
		t.Fatalf("history after force: %+v", h)
	}
	// The failed file was not run by force: one row only in needs_repair.
	var n int
	if err := conn.QueryRow(ctx, "select count(*) from needs_repair").Scan(&n); err != nil || n != 1 {
		t.Fatalf("needs_repair has %d rows (%v)", n, err)
	}
	// Forcing back down makes migrate run the file again.
	if res := runCLI(t, vars, "force", "--lane", "fast", "--version", "1"); res.code != ExitOK {
		t.Fatalf("force down: %v", res)
	}
	if res := runCLI(t, vars, "migrate", "--lane", "fast"); res.code != ExitOK {
		t.Fatalf("migrate after forcing down: %v", res)
	}
	if err := conn.QueryRow(ctx, "select count(*) from needs_repair").Scan(&n); err != nil || n != 2 {
		t.Fatalf("needs_repair has %d rows after the rerun (%v)", n, err)
	}

	for _, args := range [][]string{{"force", "--lane", "fast"}, {"force", "--version", "1"}, {"force", "--lane", "nope", "--version", "1"}, {"history", "--lane", "nope"}} {
		if res := runCLI(t, vars, args...); res.code != ExitUsage {
			t.Errorf("%q: want exit 2, got %v", args, res)
		}
	}
}

func TestMigrateDryRun(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{
		"fast/001_a.sql": "create table a (i int);",
		"fast/002_b.sql": "insert into a values (42);",
		"slow/001_s.sql": "---- tern: disable-tx ----\ncreate index concurrently s_idx on a (i);",
	})
	res := runCLI(t, vars, "migrate", "--dry-run")
	if res.code != ExitOK {
		t.Fatalf("migrate --dry-run: %v", res)
	}
	for _, want := range []string{"-- lane fast (blocking", "001_a.sql", "create table a (i int);", "insert into a values (42);",
		"-- lane slow (background", "disable-tx", "create index concurrently s_idx", "-- 3 migrations pending"} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("plan lacks %q:\n%s", want, res.stdout)
		}
	}
	if i, j := strings.Index(res.stdout, "001_a.sql"), strings.Index(res.stdout, "002_b.sql"); i < 0 || j < i {
		t.Errorf("plan out of order:\n%s", res.stdout)
	}
	// Nothing written: no table at all, not even the version or history tables.
	conn, err := pgx.Connect(t.Context(), vars["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var tables int
	if err := conn.QueryRow(t.Context(), "select count(*) from pg_tables where schemaname = 'public'").Scan(&tables); err != nil || tables != 0 {
		t.Fatalf("dry run created %d tables (%v)", tables, err)
	}
	if res := runCLI(t, vars, "migrate", "--lane", "fast"); res.code != ExitOK {
		t.Fatalf("migrate: %v", res)
	}
	res = runCLI(t, vars, "migrate", "--dry-run", "--lane", "slow")
	if res.code != ExitOK || strings.Contains(res.stdout, "001_a.sql") || !strings.Contains(res.stdout, "-- 1 migrations pending") {
		t.Fatalf("dry run of the slow lane after fast: %v", res)
	}
	res = runCLI(t, vars, "migrate", "--dry-run", "--lane", "fast")
	if res.code != ExitOK || !strings.Contains(res.stdout, "nothing pending") {
		t.Fatalf("dry run of an applied lane: %v", res)
	}
}

func TestValidateAndLint(t *testing.T) {
	t.Parallel()
	// No database: an address nothing listens on. validate and lint never connect.
	vars := func(files map[string]string) map[string]string {
		return map[string]string{"DATABASE_URL": "postgres://nobody:pw@127.0.0.1:1/none", "LANES_MIGRATIONS": testkit.WriteTree(t, files)}
	}
	risky := vars(map[string]string{
		"fast/001_new.sql":    "create table t (i int);\ncreate index t_i on t (i);\nalter table t add column j int;",
		"fast/002_old.sql":    "-- a comment\n\ncreate index old_i on existing (i);\nalter table existing add column k int;\nset statement_timeout = '1min';",
		"fast/003_safe.sql":   "set local lock_timeout = '5s';\nalter table existing add column l int;",
		"slow/001_cic.sql":    "---- tern: disable-tx ----\ncreate index concurrently x_i on existing (i);",
		"slow/002_cic_ok.sql": "---- tern: disable-tx ----\ndrop index concurrently if exists y_i;\ncreate index concurrently y_i on existing (i);",
		"slow/003_tx.sql":     "create index concurrently z_i on existing (i);",
	})
	res := runCLI(t, risky, "validate")
	if res.code != ExitOK {
		t.Fatalf("validate: %v", res)
	}
	for _, want := range []string{
		`lane "fast": 002_old.sql:3: create index on existing table existing without concurrently`,
		`lane "fast": 002_old.sql:4: takes an ACCESS EXCLUSIVE lock on existing`,
		`lane "fast": 002_old.sql:5: SET statement_timeout lasts only until this migration ends`,
		`lane "slow": 001_cic.sql:2: create index concurrently is not re-runnable`,
		`lane "slow": 003_tx.sql:1: create index concurrently cannot run inside a transaction block`,
		"ok: every lane loads (5 lint warnings)",
	} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("validate lacks %q:\n%s", want, res.stdout)
		}
	}
	for _, notWant := range []string{"001_new.sql", "003_safe.sql", "002_cic_ok.sql"} {
		if strings.Contains(res.stdout, notWant+":") {
			t.Errorf("validate warns on %s:\n%s", notWant, res.stdout)
		}
	}
	if res := runCLI(t, risky, "lint"); res.code != ExitError || !strings.Contains(res.stderr, "5 lint warnings") {
		t.Errorf("lint with warnings: %v", res)
	}
	if res := runCLI(t, risky, "validate", "--strict"); res.code != ExitError {
		t.Errorf("validate --strict with warnings: %v", res)
	}
	clean := vars(map[string]string{"fast/001_a.sql": "create table a (i int);", "slow/001_b.sql": "insert into a values (1);"})
	if res := runCLI(t, clean, "lint"); res.code != ExitOK || !strings.Contains(res.stdout, "0 lint warnings") {
		t.Errorf("lint on clean files: %v", res)
	}
	broken := vars(map[string]string{"fast/001_a.sql": "create table a (i int);", "fast/003_c.sql": "select 1;", "slow/001_b.sql": "select 1;"})
	if res := runCLI(t, broken, "validate"); res.code != ExitError || !strings.Contains(res.stderr, "fast") {
		t.Errorf("validate with a gap: %v", res)
	}
	if res := runCLI(t, clean, "validate", "--help"); res.code != ExitOK || !strings.Contains(res.stdout, "--strict") || strings.Contains(res.stdout, "--lane LANE") {
		t.Errorf("validate --help: %v", res)
	}
	for _, args := range [][]string{{"history", "--help"}, {"force", "--help"}, {"lint", "--help"}} {
		if res := runCLI(t, clean, args...); res.code != ExitOK || !strings.Contains(res.stdout, "Usage: lanes "+args[0]) {
			t.Errorf("%q: %v", args, res)
		}
	}
}
