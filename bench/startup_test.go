package bench

import (
	"context"
	"fmt"
	"io/fs"
	"strconv"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/tern/v2/migrate"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/migrator"
)

// Measurement 1: how long a replica takes to become ready while another replica applies a long
// slow-lane migration, with multi-lanes and with the naive design (both lanes through tern's
// own Migrator, one version table each, hence one constant advisory lock), each also on an
// idle database (nothing running) for reference.

func mapFile(s string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(s)} }

// startupFast is the fast lane of the start-up benchmark.
var startupFast = fstest.MapFS{
	"001_create_example.sql":   mapFile("create table example (id int primary key, name text not null);"),
	"002_populate_example.sql": mapFile("insert into example select g, 'row ' || g from generate_series(1, 100) g;"),
}

// startupSlow is the slow lane: one migration sleeping for d.
func startupSlow(d time.Duration) fstest.MapFS {
	return fstest.MapFS{"001_load_example.sql": mapFile("select pg_sleep(" + strconv.FormatFloat(d.Seconds(), 'f', 3, 64) + ");")}
}

func startupLanes(slow fs.FS) []migrator.Lane {
	return []migrator.Lane{
		{Name: "fast", Mode: migrator.Blocking, FS: startupFast},
		{Name: "slow", Mode: migrator.Background, FS: slow},
	}
}

// startLanesReplica is one multi-lanes replica start: load the lanes, then Start (LISTEN, read
// the state, apply the blocking lanes, start the background ones). It returns the started
// runtime (to be closed) and how long it took.
func startLanesReplica(ctx context.Context, cc *pgx.ConnConfig, slow fs.FS) (*app.Runtime, time.Duration, error) {
	t0 := time.Now()
	m, err := migrator.New(cc, startupLanes(slow), migrator.Config{})
	if err != nil {
		return nil, 0, err
	}
	r, err := app.New(m, app.Config{})
	if err != nil {
		return nil, 0, err
	}
	if err := r.Start(ctx); err != nil {
		_ = r.Close()
		return nil, 0, err
	}
	return r, time.Since(t0), nil
}

// startTernReplica is one naive replica start: connect, then the fast lane through tern's
// Migrator (NewMigrator, LoadMigrations, Migrate on version table fast_version).
func startTernReplica(ctx context.Context, cc *pgx.ConnConfig) (time.Duration, error) {
	t0 := time.Now()
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := ternMigrate(ctx, conn, "fast_version", startupFast); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

func ternMigrate(ctx context.Context, conn *pgx.Conn, table string, fsys fs.FS) error {
	tm, err := migrate.NewMigrator(ctx, conn, table)
	if err != nil {
		return fmt.Errorf("tern %s: %w", table, err)
	}
	if err := tm.LoadMigrations(fsys); err != nil {
		return fmt.Errorf("tern %s: %w", table, err)
	}
	if err := tm.Migrate(ctx); err != nil {
		return fmt.Errorf("tern %s: %w", table, err)
	}
	return nil
}

// waitForSleep waits until a session of the database runs pg_sleep, i.e. the slow migration
// has started and holds its locks.
func waitForSleep(ctx context.Context, dbURL string) error {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return waitFor(ctx, 30*time.Second, "the slow migration to start", func() (bool, error) {
		var n int
		err := conn.QueryRow(ctx, `select count(*) from pg_stat_activity
where datname = current_database() and state = 'active' and query like 'select pg_sleep(%'`).Scan(&n)
		return n > 0, err
	})
}

// startupRun is one repetition of one design: the ready times of k replicas started together.
type startupRun func(b *testing.B, ctx context.Context, k int, sleep time.Duration) []time.Duration

// lanesBusy: replica A starts and runs the slow lane; once its pg_sleep runs, k replicas start.
func lanesBusy(b *testing.B, ctx context.Context, k int, sleep time.Duration) []time.Duration {
	cc := connConfig(b, pgtest.NewDB(b))
	slow := startupSlow(sleep)
	a, _, err := startLanesReplica(ctx, cc, slow)
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close() // cancels A's slow migration: it rolls back
	if err := waitForSleep(ctx, cc.ConnString()); err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	out := startKLanes(b, ctx, cc, slow, k)
	if time.Since(t0) > sleep {
		b.Errorf("the replicas took %v, longer than the slow migration: not measured during it", time.Since(t0))
	}
	return out
}

// lanesIdle: both lanes already applied (the slow one instantly), nothing running; k replicas start.
func lanesIdle(b *testing.B, ctx context.Context, k int, sleep time.Duration) []time.Duration {
	cc := connConfig(b, pgtest.NewDB(b))
	m, err := migrator.New(cc, startupLanes(startupSlow(0)), migrator.Config{})
	if err != nil {
		b.Fatal(err)
	}
	for _, lane := range []string{"fast", "slow"} {
		if _, err := m.Migrate(ctx, lane); err != nil {
			b.Fatal(err)
		}
	}
	return startKLanes(b, ctx, cc, startupSlow(sleep), k)
}

func startKLanes(b *testing.B, ctx context.Context, cc *pgx.ConnConfig, slow fs.FS, k int) []time.Duration {
	out := make([]time.Duration, k)
	rs := make([]*app.Runtime, k)
	err := parallel(k, k, func(i int) error {
		var err error
		rs[i], out[i], err = startLanesReplica(ctx, cc, slow)
		return err
	})
	for _, r := range rs {
		if r != nil {
			_ = r.Close()
		}
	}
	if err != nil {
		b.Fatal(err)
	}
	return out
}

// ternBusy: replica A applies the fast lane then the slow lane through tern; once its pg_sleep
// runs, k replicas start (and wait for tern's lock).
func ternBusy(b *testing.B, ctx context.Context, k int, sleep time.Duration) []time.Duration {
	cc := connConfig(b, pgtest.NewDB(b))
	connFast, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		b.Fatal(err)
	}
	defer connFast.Close(ctx)
	if err := ternMigrate(ctx, connFast, "fast_version", startupFast); err != nil {
		b.Fatal(err)
	}
	connSlow, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		b.Fatal(err)
	}
	defer connSlow.Close(ctx)
	slowDone := make(chan error, 1)
	go func() { slowDone <- ternMigrate(ctx, connSlow, "slow_version", startupSlow(sleep)) }()
	if err := waitForSleep(ctx, cc.ConnString()); err != nil {
		b.Fatal(err)
	}
	out := startKTern(b, ctx, cc, k)
	if err := <-slowDone; err != nil {
		b.Fatal(err)
	}
	return out
}

// ternIdle: both lanes already applied through tern, nothing running; k replicas start.
func ternIdle(b *testing.B, ctx context.Context, k int, sleep time.Duration) []time.Duration {
	cc := connConfig(b, pgtest.NewDB(b))
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := ternMigrate(ctx, conn, "fast_version", startupFast); err != nil {
		b.Fatal(err)
	}
	if err := ternMigrate(ctx, conn, "slow_version", startupSlow(0)); err != nil {
		b.Fatal(err)
	}
	return startKTern(b, ctx, cc, k)
}

func startKTern(b *testing.B, ctx context.Context, cc *pgx.ConnConfig, k int) []time.Duration {
	out := make([]time.Duration, k)
	if err := parallel(k, k, func(i int) error {
		var err error
		out[i], err = startTernReplica(ctx, cc)
		return err
	}); err != nil {
		b.Fatal(err)
	}
	return out
}

func BenchmarkStartupDuringSlowMigration(b *testing.B) {
	noteLoad("StartupDuringSlowMigration")
	sleep := 5 * time.Second
	if quick() {
		sleep = 2 * time.Second
	}
	n := reps(5, 3)
	designs := []struct {
		name string
		run  startupRun
	}{
		{"lanes-busy", lanesBusy},
		{"tern-busy", ternBusy},
		{"lanes-idle", lanesIdle},
		{"tern-idle", ternIdle},
	}
	var rows [][]string
	for _, k := range []int{1, 10} {
		b.Run(fmt.Sprintf("replicas=%d", k), func(b *testing.B) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			// Per design: the median and the slowest replica of each repetition, in ms.
			med := make(map[string][]float64)
			slowest := make(map[string][]float64)
			for range n {
				for _, d := range designs { // interleaved, so drift hits every design alike
					var xs []float64
					for _, t := range d.run(b, ctx, k, sleep) {
						xs = append(xs, ms(t))
					}
					med[d.name] = append(med[d.name], median(xs))
					slowest[d.name] = append(slowest[d.name], maxOf(xs))
				}
			}
			for _, d := range designs {
				b.ReportMetric(median(med[d.name]), d.name+"-ms")
			}
			ratio := median(med["tern-busy"]) / median(med["lanes-busy"])
			b.ReportMetric(ratio, "tern/lanes")
			row := []string{strconv.Itoa(k)}
			for _, d := range designs {
				row = append(row, spread(med[d.name], 1), spread(slowest[d.name], 1))
			}
			rows = append(rows, append(row, fmt.Sprintf("%.0f×", ratio)))
		})
	}
	table(fmt.Sprintf("Start-up during a %v slow migration: ready time in ms, median of %d runs (min–max)", sleep, n),
		[]string{"replicas", "lanes busy p50", "lanes busy max", "tern busy p50", "tern busy max",
			"lanes idle p50", "lanes idle max", "tern idle p50", "tern idle max", "tern/lanes busy"}, rows)
}
