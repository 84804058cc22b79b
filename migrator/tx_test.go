package migrator_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// The helper process of TestFaultSigkillAfterNestedCommit: run by the test binary itself when
// this variable names a database URL (see TestMain).
const nestedHelperEnv = "LANES_TEST_NESTED_HELPER_URL"

// nestedLane is a background lane whose only migration opens a nested transaction through the
// pgx.Tx it is given, inserts a row and commits the nested transaction, then calls after.
func nestedLane(after func(ctx context.Context) error) migrator.Lane {
	return migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{{Version: 1, Name: "nested",
		Up: func(ctx context.Context, tx pgx.Tx) error {
			err := pgx.BeginFunc(ctx, tx, func(inner pgx.Tx) error {
				_, err := inner.Exec(ctx, "insert into effects values ('nested')")
				return err
			})
			if err != nil {
				return err
			}
			return after(ctx)
		}}}}
}

// runNestedHelper applies nestedLane against url, printing "inner committed" once the nested
// transaction has committed, then blocks until killed.
func runNestedHelper(url string) {
	cc, err := pgx.ParseConfig(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	m, err := migrator.New(cc, []migrator.Lane{nestedLane(func(ctx context.Context) error {
		fmt.Println("inner committed")
		<-ctx.Done() // never cancelled: the test kills this process here
		return ctx.Err()
	})}, migrator.Config{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	_, err = m.Migrate(context.Background(), "slow")
	fmt.Fprintln(os.Stderr, "Migrate returned:", err)
	os.Exit(3)
}

// A Go migration gets the migration's transaction: a nested Begin is a savepoint, so an error
// returned after the nested commit rolls back everything, and nothing is recorded.
func TestGoMigrationNestedBeginIsASavepoint(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	if _, err := conn.Exec(ctx, "create table effects (what text)"); err != nil {
		t.Fatal(err)
	}
	_, err := newMigrator(t, cc, nestedLane(func(context.Context) error { return errors.New("gave up after the nested commit") })).Migrate(ctx, "slow")
	var me *migrator.MigrationError
	if !errors.As(err, &me) || me.File != "001_nested.go" {
		t.Fatalf("err = %v", err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from effects"); n != 0 {
		t.Fatalf("the nested transaction's commit committed the migration: %d rows stayed after the migration failed", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select coalesce(max(version), 0) from lanes_slow_version"); n != 0 {
		t.Fatalf("version = %d after a failed migration", n)
	}
	// The same migration returning nil applies once and records its version.
	if _, err := newMigrator(t, cc, nestedLane(func(context.Context) error { return nil })).Migrate(ctx, "slow"); err != nil {
		t.Fatal(err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from effects"); n != 1 {
		t.Fatalf("rows = %d, want 1", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select max(version) from lanes_slow_version"); n != 1 {
		t.Fatalf("version = %d, want 1", n)
	}
}

// Process level: a migrator process killed (SIGKILL) after its Go migration's nested commit
// leaves neither the effect nor the version; the rerun applies the migration exactly once.
func TestFaultSigkillAfterNestedCommit(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	if _, err := conn.Exec(ctx, "create table effects (what text)"); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), nestedHelperEnv+"="+cc.ConnString())
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		if strings.TrimSpace(line) != "inner committed" {
			waited <- fmt.Errorf("helper printed %q", line)
			return
		}
		waited <- nil
	}()
	select {
	case err := <-waited:
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("%v; stderr: %s", err, stderr.String())
		}
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper did not reach the nested commit; stderr: %s", stderr.String())
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()

	// The killed session's transaction is rolled back once the server notices the client is
	// gone (client_connection_check_interval, or at once for an idle session): wait for the
	// session to end, then look.
	deadline := time.Now().Add(20 * time.Second)
	for pgtest.Scalar[int](t, conn, "select count(*) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid() and application_name = 'lanes'") > 0 {
		if time.Now().After(deadline) {
			t.Fatal("the killed helper's session did not end")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from effects"); n != 0 {
		t.Fatalf("SIGKILL after the nested commit left the effect behind: %d rows", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select coalesce((select max(version) from lanes_slow_version), 0)"); n != 0 {
		t.Fatalf("version = %d after the kill", n)
	}
	if _, err := newMigrator(t, cc, nestedLane(func(context.Context) error { return nil })).Migrate(ctx, "slow"); err != nil {
		t.Fatal(err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from effects"); n != 1 {
		t.Fatalf("after the rerun: %d rows, want exactly 1", n)
	}
}

// A migration that ends the transaction it runs in is refused before its version is recorded:
// a COMMIT in a file, and a Go migration committing through tx.Conn().
func TestMigrationEndingItsTransactionIsNotRecorded(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		lane migrator.Lane
		file string
	}{
		{"file", migrator.Lane{Name: "fast", FS: fstest.MapFS{
			"001_commit.sql": testkit.File("insert into effects values ('before');\ncommit;\ninsert into effects values ('after');"),
		}}, "001_commit.sql"},
		{"go", migrator.Lane{Name: "fast", Funcs: []migrator.GoMigration{{Version: 1, Name: "commit", Up: func(ctx context.Context, tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "insert into effects values ('before')"); err != nil {
				return err
			}
			_, err := tx.Conn().Exec(ctx, "commit")
			return err
		}}}}, "001_commit.go"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cc, conn := setup(t)
			ctx := ctxT(t)
			if _, err := conn.Exec(ctx, "create table effects (what text)"); err != nil {
				t.Fatal(err)
			}
			_, err := newMigrator(t, cc, tc.lane).Migrate(ctx, "fast")
			var me *migrator.MigrationError
			if !errors.As(err, &me) || !errors.Is(err, migrator.ErrTxEnded) || me.Lane != "fast" || me.File != tc.file {
				t.Fatalf("err = %v, want a *MigrationError for %s wrapping ErrTxEnded", err, tc.file)
			}
			if !strings.Contains(err.Error(), tc.file) || !strings.Contains(err.Error(), `"fast"`) {
				t.Fatalf("error does not name lane and file: %v", err)
			}
			if n := pgtest.Scalar[int](t, conn, "select coalesce((select max(version) from lanes_fast_version), 0)"); n != 0 {
				t.Fatalf("version %d recorded for a migration that ended its transaction", n)
			}
			if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where error is null"); n != 0 {
				t.Fatalf("%d success rows in the history", n)
			}
			if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where error is not null and name = $1", tc.file); n != 1 {
				t.Fatalf("failure rows = %d, want 1", n)
			}
		})
	}
}

// UpNoTx runs outside any transaction (CREATE INDEX CONCURRENTLY works there), and one that
// leaves a transaction open is refused and rolled back.
func TestGoMigrationWithoutTransaction(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background,
		FS: fstest.MapFS{"001_t.sql": testkit.File("create table t (i int);")},
		Funcs: []migrator.GoMigration{
			{Version: 2, Name: "index", UpNoTx: func(ctx context.Context, c *pgx.Conn) error {
				_, err := c.Exec(ctx, "create index concurrently t_i on t (i)")
				return err
			}},
			{Version: 3, Name: "left_open", UpNoTx: func(ctx context.Context, c *pgx.Conn) error {
				_, err := c.Exec(ctx, "begin; insert into t values (42)")
				return err
			}},
		}}
	m := newMigrator(t, cc, lane)
	res, err := m.Migrate(ctx, "slow")
	if !errors.Is(err, migrator.ErrTxEnded) || !strings.Contains(err.Error(), "003_left_open.go") {
		t.Fatalf("err = %v", err)
	}
	if res.To != 2 {
		t.Fatalf("result = %+v, want version 2", res)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_index where indexrelid = 't_i'::regclass and indisvalid"); n != 1 {
		t.Fatal("concurrent index missing or invalid")
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from t"); n != 0 {
		t.Fatalf("the transaction left open was committed: %d rows", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select max(version) from lanes_slow_version"); n != 2 {
		t.Fatalf("version = %d, want 2", n)
	}
	// Both Up and UpNoTx, or neither, is a load error.
	noop := func(context.Context, pgx.Tx) error { return nil }
	noopConn := func(context.Context, *pgx.Conn) error { return nil }
	_, err = migrator.New(cc, []migrator.Lane{{Name: "slow", Funcs: []migrator.GoMigration{{Version: 1, Name: "x", Up: noop, UpNoTx: noopConn}}}}, migrator.Config{})
	var le *migrator.LoadError
	if !errors.As(err, &le) || le.File != "001_x.go" {
		t.Fatalf("both Up and UpNoTx: err = %v", err)
	}
}

// A Go migration that swallows a failed statement's error is told so, and nothing stays.
func TestGoMigrationSwallowingAnErrorIsRolledBack(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	lane := migrator.Lane{Name: "fast", Funcs: []migrator.GoMigration{{Version: 1, Name: "swallow", Up: func(ctx context.Context, tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "create table made (i int)"); err != nil {
			return err
		}
		_, _ = tx.Exec(ctx, "select 1/0") // the error is dropped
		return nil
	}}}}
	_, err := newMigrator(t, cc, lane).Migrate(ctx, "fast")
	var me *migrator.MigrationError
	if !errors.As(err, &me) || me.File != "001_swallow.go" || !strings.Contains(err.Error(), "returned no error") {
		t.Fatalf("err = %v", err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_class where relname = 'made'"); n != 0 {
		t.Fatal("the aborted migration left its table")
	}
}
