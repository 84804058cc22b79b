package pgcluster_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/goleak"

	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgtest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// startCluster starts a cluster stopped at the end of the test, or skips when the machine has
// no server binaries and LANES_TEST_REQUIRE_DB is not 1.
func startCluster(t *testing.T, opts pgcluster.Options) *pgcluster.Cluster {
	t.Helper()
	if _, err := pgcluster.FindBinaries(); errors.Is(err, pgcluster.ErrNoBinaries) && os.Getenv("LANES_TEST_REQUIRE_DB") != "1" {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	c, err := pgcluster.Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Error(err)
		}
	})
	return c
}

// queryInt runs a one-value query on a new connection to url.
func queryInt(ctx context.Context, url, sql string) (int, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var n int
	err = conn.QueryRow(ctx, sql).Scan(&n)
	return n, err
}

func TestClusterLifecycle(t *testing.T) {
	t.Parallel()
	c := startCluster(t, pgcluster.Options{
		MaxConnections: 150,
		Params:         map[string]string{"application_name": "it's pgcluster"},
	})
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	url := c.ConnString("postgres")

	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var maxConns, appName string
	if err := conn.QueryRow(ctx, "select current_setting('max_connections'), current_setting('application_name')").Scan(&maxConns, &appName); err != nil {
		t.Fatal(err)
	}
	if maxConns != "150" || appName != "it's pgcluster" {
		t.Fatalf("max_connections=%q application_name=%q, want 150 and the Params value", maxConns, appName)
	}

	port := c.Port()
	if err := c.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if c.Port() != port {
		t.Fatalf("port changed on restart: %d to %d", port, c.Port())
	}
	if err := conn.Ping(ctx); err == nil {
		t.Fatal("a connection opened before the restart still works")
	}
	if n, err := queryInt(ctx, url, "select 1"); err != nil || n != 1 {
		t.Fatalf("query after restart: %d, %v", n, err)
	}

	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	if _, err := queryInt(ctx, url, "select 1"); err == nil {
		t.Fatal("connected to a killed server")
	}
	if err := c.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if n, err := queryInt(ctx, url, "select 1"); err != nil || n != 1 {
		t.Fatalf("query after kill and restart: %d, %v", n, err)
	}

	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := c.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if _, err := queryInt(ctx, url, "select 1"); err == nil {
		t.Fatal("connected to a stopped server")
	}
	if err := c.Restart(ctx); err == nil {
		t.Fatal("Restart after Stop succeeded")
	}
}

func TestTwoClustersRunSideBySide(t *testing.T) {
	t.Parallel()
	a := startCluster(t, pgcluster.Options{})
	b := startCluster(t, pgcluster.Options{})
	if a.Port() == b.Port() {
		t.Fatalf("both clusters on port %d", a.Port())
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	for _, c := range []*pgcluster.Cluster{a, b} {
		if n, err := queryInt(ctx, c.ConnString("postgres"), "select current_setting('max_connections')::int"); err != nil || n != 100 {
			t.Fatalf("max_connections: %d, %v; want 100", n, err)
		}
	}
}

func TestStartFailures(t *testing.T) {
	t.Parallel()
	_, err := pgcluster.Start(t.Context(), pgcluster.Options{BinDir: t.TempDir()})
	if !errors.Is(err, pgcluster.ErrNoBinaries) {
		t.Fatalf("Start with an empty BinDir: %v, want ErrNoBinaries", err)
	}
	if _, err := pgcluster.FindBinaries(); err != nil {
		t.Skip(err)
	}
	_, err = pgcluster.Start(t.Context(), pgcluster.Options{Params: map[string]string{"shared_buffers": "lots"}})
	if err == nil || !strings.Contains(err.Error(), "server log:") || !strings.Contains(err.Error(), "shared_buffers") {
		t.Fatalf("Start with a bad setting: %v, want an error quoting the server log", err)
	}
}

// serverOnlyBinDir returns a directory holding only links to initdb, pg_ctl and postgres, as
// the server builds without client programs (no pg_basebackup) do.
func serverOnlyBinDir(t *testing.T) string {
	t.Helper()
	from, err := pgcluster.FindBinaries()
	if errors.Is(err, pgcluster.ErrNoBinaries) && os.Getenv("LANES_TEST_REQUIRE_DB") != "1" {
		t.Skip(err)
	} else if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "pgcluster-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil { // the postgres user runs them when we are root
		t.Fatal(err)
	}
	for _, name := range []string{"initdb", "pg_ctl", "postgres"} {
		if err := os.Symlink(filepath.Join(from, name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestStandbyReplaysThePrimaryAndRefusesListen builds the standby from server binaries alone
// (no pg_basebackup), as on the server builds CI tests PostgreSQL 13 to 18 with.
func TestStandbyReplaysThePrimaryAndRefusesListen(t *testing.T) {
	t.Parallel()
	primary := startCluster(t, pgcluster.Options{BinDir: serverOnlyBinDir(t)})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	standby := pgtest.StartStandby(t, primary, 2*time.Minute)
	if standby.Port() == primary.Port() {
		t.Fatalf("standby on the primary's port %d", primary.Port())
	}
	if n, err := queryInt(ctx, standby.ConnString("postgres"), "select pg_is_in_recovery()::int"); err != nil || n != 1 {
		t.Fatalf("pg_is_in_recovery on the standby: %d, %v", n, err)
	}
	conn, err := pgx.Connect(ctx, primary.ConnString("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "create table replicated as select 42 as answer"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		n, err := queryInt(ctx, standby.ConnString("postgres"), "select answer from replicated")
		if err == nil && n == 42 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the standby never replayed the primary's table: %d, %v", n, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	sconn, err := pgx.Connect(ctx, standby.ConnString("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer sconn.Close(context.WithoutCancel(ctx))
	var pgErr *pgconn.PgError
	if _, err := sconn.Exec(ctx, "listen anything"); !errors.As(err, &pgErr) || pgErr.Code != "25006" {
		t.Fatalf("LISTEN on the standby: %v, want SQLSTATE 25006", err)
	}
}

// TestKillLosesNoCommit commits and kills the server at once, as crash tests do: the commit
// survives the crash and the restart (a cluster with synchronous_commit off lost it).
func TestKillLosesNoCommit(t *testing.T) {
	t.Parallel()
	c := startCluster(t, pgcluster.Options{})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	exec := func(sql string, args ...any) {
		t.Helper()
		conn, err := pgx.Connect(ctx, c.ConnString("postgres"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.WithoutCancel(ctx))
		if _, err := conn.Exec(ctx, sql, args...); err != nil {
			t.Fatal(err)
		}
	}
	exec("create table committed (i int)")
	for i := range 5 {
		exec("insert into committed values ($1)", i)
		if err := c.Kill(); err != nil {
			t.Fatal(err)
		}
		if err := c.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		if n, err := queryInt(ctx, c.ConnString("postgres"), "select count(*) from committed"); err != nil || n != i+1 {
			t.Fatalf("after the crash %d: %d rows committed before it survive, want %d (%v)", i+1, n, i+1, err)
		}
	}
}
