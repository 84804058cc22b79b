package bench

import (
	"context"
	"fmt"
	"io/fs"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/tern/v2/migrate"

	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/migrator"
)

// Measurement 4: applying many small migrations through multi-lanes (migrator.Migrate, one
// lane) and through tern's Migrator directly, each on a fresh database of the test server.

// migrationKind is a family of generated migrations.
type migrationKind struct {
	name string
	gen  func(i int) string
}

var migrationKinds = []migrationKind{
	// ddl: create a table and insert a row, two statements, so that multi-lanes'
	// statement-by-statement execution shows.
	{"ddl", func(i int) string {
		return fmt.Sprintf("create table t_%04d (id int primary key, v text not null);\ninsert into t_%04d values (1, 'x');\n", i, i)
	}},
	// tiny: one one-row insert into a table made by the first migration, so that the
	// bookkeeping around each migration dominates.
	{"tiny", func(i int) string {
		if i == 1 {
			return "create table t_log (i int primary key);\n"
		}
		return fmt.Sprintf("insert into t_log values (%d);\n", i)
	}},
}

// smallMigrations returns n files of the kind.
func smallMigrations(kind migrationKind, n int) fstest.MapFS {
	fsys := fstest.MapFS{}
	for i := 1; i <= n; i++ {
		fsys[fmt.Sprintf("%04d_step_%d.sql", i, i)] = mapFile(kind.gen(i))
	}
	return fsys
}

// applyResult is one timed run: load (read and render the files) and apply (connect, version
// table, every migration), both wall clock.
type applyResult struct{ load, apply time.Duration }

func applyTern(ctx context.Context, cc *pgx.ConnConfig, fsys fs.FS) (applyResult, error) {
	var r applyResult
	t0 := time.Now()
	tm, err := migrate.NewMigrator(ctx, nil, "schema_version")
	if err != nil {
		return r, err
	}
	if err := tm.LoadMigrations(fsys); err != nil {
		return r, err
	}
	r.load = time.Since(t0)
	t0 = time.Now()
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return r, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	tm2, err := migrate.NewMigrator(ctx, conn, "schema_version") // creates the version table
	if err != nil {
		return r, err
	}
	tm2.Migrations = tm.Migrations
	if err := tm2.Migrate(ctx); err != nil {
		return r, err
	}
	r.apply = time.Since(t0)
	return r, nil
}

func applyLanes(mode migrator.Mode) func(ctx context.Context, cc *pgx.ConnConfig, fsys fs.FS) (applyResult, error) {
	return func(ctx context.Context, cc *pgx.ConnConfig, fsys fs.FS) (applyResult, error) {
		var r applyResult
		t0 := time.Now()
		m, err := migrator.New(cc, []migrator.Lane{{Name: "main", Mode: mode, FS: fsys}}, migrator.Config{})
		if err != nil {
			return r, err
		}
		r.load = time.Since(t0)
		t0 = time.Now()
		res, err := m.Migrate(ctx, "main")
		if err != nil {
			return r, err
		}
		if res.Applied != len(m.Lanes()[0].Migrations) {
			return r, fmt.Errorf("applied %d migrations, want %d", res.Applied, len(m.Lanes()[0].Migrations))
		}
		r.apply = time.Since(t0)
		return r, nil
	}
}

type applyDesign struct {
	name string
	run  func(ctx context.Context, cc *pgx.ConnConfig, fsys fs.FS) (applyResult, error)
}

var applyDesigns = []applyDesign{
	{"tern", applyTern},
	{"lanes-blocking", applyLanes(migrator.Blocking)},
	{"lanes-background", applyLanes(migrator.Background)},
}

func BenchmarkApplyOverhead(b *testing.B) {
	noteLoad("ApplyOverhead")
	counts := []int{250, 1000}
	if quick() {
		counts = []int{100, 300}
	}
	n := reps(5, 3)
	var rows, loadRows [][]string
	for _, kind := range migrationKinds {
		for _, count := range counts {
			fsys := smallMigrations(kind, count)
			b.Run(fmt.Sprintf("kind=%s/migrations=%d", kind.name, count), func(b *testing.B) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
				defer cancel()
				perMig := map[string][]float64{} // µs per migration, one per repetition
				load := map[string][]float64{}   // ms for all files
				// At the largest count each design also runs once more per repetition with a
				// tracer, for where the time goes. Designs are interleaved within a repetition,
				// so that other load on the machine hits each alike.
				traced := count == counts[len(counts)-1]
				rtTime := map[string]map[string][]float64{} // design, kind of round trip: µs per migration, per run
				rtCalls := map[string]map[string]float64{}  // design, kind: round trips per migration
				for range n {
					for _, d := range applyDesigns {
						cc := connConfig(b, pgtest.NewDB(b))
						r, err := d.run(ctx, cc, fsys)
						if err != nil {
							b.Fatalf("%s: %v", d.name, err)
						}
						perMig[d.name] = append(perMig[d.name], float64(r.apply.Microseconds())/float64(count))
						load[d.name] = append(load[d.name], ms(r.load))
						if !traced {
							continue
						}
						cc = connConfig(b, pgtest.NewDB(b))
						rt := newRoundTrips(d.name, count)
						cc.Tracer = rt
						if _, err := d.run(ctx, cc, fsys); err != nil {
							b.Fatalf("%s traced: %v", d.name, err)
						}
						if rtTime[d.name] == nil {
							rtTime[d.name], rtCalls[d.name] = map[string][]float64{}, map[string]float64{}
						}
						for k, t := range rt.time {
							rtTime[d.name][k] = append(rtTime[d.name][k], float64(t.Microseconds())/float64(count))
							rtCalls[d.name][k] = float64(rt.calls[k]) / float64(count)
						}
					}
				}
				if traced {
					printProfile(kind.name, count, n, rtTime, rtCalls)
				}
				tern := median(perMig["tern"])
				for _, d := range applyDesigns {
					b.ReportMetric(median(perMig[d.name]), d.name+"-µs/mig")
				}
				row := []string{kind.name, strconv.Itoa(count)}
				for _, d := range applyDesigns {
					row = append(row, spread(perMig[d.name], 0))
				}
				row = append(row, fmt.Sprintf("%.2f", median(perMig["lanes-blocking"])/tern),
					fmt.Sprintf("%.2f", median(perMig["lanes-background"])/tern))
				rows = append(rows, row)
				lrow := []string{kind.name, strconv.Itoa(count)}
				for _, d := range applyDesigns[:2] {
					lrow = append(lrow, spread(load[d.name], 1))
				}
				loadRows = append(loadRows, lrow)
			})
		}
	}
	table(fmt.Sprintf("Apply overhead: µs per migration (connect, version table and every migration, divided by the count), median of %d fresh databases (min–max)", n),
		[]string{"kind", "migrations", "tern", "lanes blocking", "lanes background", "blocking/tern", "background/tern"}, rows)
	table("Loading the files (read, render, split, checksum): ms for all files, median (min–max)",
		[]string{"kind", "migrations", "tern LoadMigrations", "lanes migrator.New"}, loadRows)
}

// printProfile prints where the time of the traced runs went: per kind of round trip, the
// median over the runs of its client-side time per migration, and its count per migration.
func printProfile(kind string, count, runs int, times map[string]map[string][]float64, calls map[string]map[string]float64) {
	var rtKinds []string
	for _, d := range applyDesigns {
		for k := range times[d.name] {
			if !slices.Contains(rtKinds, k) {
				rtKinds = append(rtKinds, k)
			}
		}
	}
	slices.Sort(rtKinds)
	var rows [][]string
	totals, totalCalls := map[string]float64{}, map[string]float64{}
	for _, k := range rtKinds {
		row := []string{k}
		for _, d := range applyDesigns {
			xs := times[d.name][k]
			if len(xs) == 0 {
				row = append(row, "-")
				continue
			}
			totals[d.name] += median(xs)
			totalCalls[d.name] += calls[d.name][k]
			row = append(row, fmt.Sprintf("%.0f µs, %.2f rt", median(xs), calls[d.name][k]))
		}
		rows = append(rows, row)
	}
	header, total := []string{"round trip, per migration"}, []string{"total"}
	for _, d := range applyDesigns {
		header = append(header, d.name)
		total = append(total, fmt.Sprintf("%.0f µs, %.2f rt", totals[d.name], totalCalls[d.name]))
	}
	table(fmt.Sprintf("Where the time goes, %s migrations: client-side time per migration (median of %d traced runs of %d) and round trips per migration", kind, runs, count),
		header, append(rows, total))
}

// roundTrips is a pgx tracer that sums the time of each kind of query and batch.
type roundTrips struct {
	design     string
	migrations int
	mu         sync.Mutex
	time       map[string]time.Duration
	calls      map[string]int
}

func newRoundTrips(design string, migrations int) *roundTrips {
	return &roundTrips{design: design, migrations: migrations, time: map[string]time.Duration{}, calls: map[string]int{}}
}

// traceStart is the context key of a traced call's start: its time and SQL.
type traceStart struct{}

type started struct {
	t0  time.Time
	sql string
}

func (r *roundTrips) add(kind string, d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.time[kind] += d
	r.calls[kind]++
}

func classify(sql string) string {
	s := strings.ToLower(strings.TrimSpace(sql))
	switch {
	case s == "begin":
		return "begin"
	case s == "commit":
		return "commit"
	case s == "reset all":
		return "reset all"
	case strings.HasPrefix(s, "update ") && strings.Contains(s, "set version"):
		return "version update"
	case strings.HasPrefix(s, "create table t_"), strings.HasPrefix(s, "insert into t_"):
		return "migration SQL"
	}
	return "setup (lock, version read, tables)"
}

func (r *roundTrips) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	return context.WithValue(ctx, traceStart{}, started{time.Now(), data.SQL})
}

func (r *roundTrips) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryEndData) {
	if s, ok := ctx.Value(traceStart{}).(started); ok {
		r.add(classify(s.sql), time.Since(s.t0))
	}
}

func (r *roundTrips) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	return context.WithValue(ctx, traceStart{}, started{t0: time.Now()})
}

func (r *roundTrips) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}

func (r *roundTrips) TraceBatchEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchEndData) {
	if s, ok := ctx.Value(traceStart{}).(started); ok {
		r.add("record batch (reset all, version, history[, notify])", time.Since(s.t0))
	}
}
