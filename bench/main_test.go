package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgtest"
)

func TestMain(m *testing.M) {
	if dbURL := os.Getenv("LANES_BENCH_BARE_LISTENER"); dbURL != "" {
		os.Exit(bareListener(dbURL)) // this binary run again as a bare listener process
	}
	pgtest.RunMain(m, stopBigServer)
}

// quick reports a quick run: -short or LANES_BENCH_QUICK=1.
func quick() bool { return testing.Short() || os.Getenv("LANES_BENCH_QUICK") == "1" }

// reps returns the number of repetitions: LANES_BENCH_REPS when set, else full or short.
func reps(full, short int) int {
	if n, err := strconv.Atoi(os.Getenv("LANES_BENCH_REPS")); err == nil && n > 0 {
		return n
	}
	if quick() {
		return short
	}
	return full
}

// bigServer is the throwaway cluster of the benchmarks that need many connections,
// pg_stat_statements and commit timestamps. It is started on first use and stopped by TestMain.
var bigServer struct {
	once    sync.Once
	cluster *pgcluster.Cluster
	admin   string
	err     error
}

// bigMaxConnections leaves room for 1,000 replicas starting at once (a listener each, and for a
// moment the connection of each one's first try of the slow lane) plus the benchmark's own.
const bigMaxConnections = 2300

// driverRole is the role of the driver's connections on the throwaway cluster.
const driverRole = "lanes_driver"

// bigAdminURL returns the admin URL of the throwaway cluster, starting it on first use.
func bigAdminURL(b *testing.B) string {
	b.Helper()
	bigServer.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c, err := pgcluster.Start(ctx, pgcluster.Options{
			MaxConnections: bigMaxConnections,
			Params: map[string]string{
				"shared_preload_libraries":       "pg_stat_statements",
				"pg_stat_statements.max":         "10000",
				"track_commit_timestamp":         "on",
				"superuser_reserved_connections": "3",
			},
		})
		if err != nil {
			bigServer.err = err
			return
		}
		bigServer.cluster, bigServer.admin = c, c.ConnString("postgres")
		if err := execOn(ctx, bigServer.admin, "create extension if not exists pg_stat_statements"); err != nil {
			bigServer.err = err
		}
		// The driver that applies the slow lane connects as its own role, so that its
		// statements can be told apart from the replicas' in pg_stat_statements.
		if err := execOn(ctx, bigServer.admin, "create role "+driverRole+" login superuser"); err != nil {
			bigServer.err = err
		}
	})
	if bigServer.err != nil {
		b.Fatalf("throwaway cluster: %v", bigServer.err)
	}
	return bigServer.admin
}

func stopBigServer() {
	if bigServer.cluster != nil {
		if err := bigServer.cluster.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "bench: stop cluster: %v\n", err)
		}
	}
}

// execOn runs one statement on a new connection.
func execOn(ctx context.Context, dbURL, sql string, args ...any) error {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = conn.Exec(ctx, sql, args...)
	return err
}

// bigDB creates a fresh database on the throwaway cluster and returns its name, its URL and a
// function dropping it.
func bigDB(b *testing.B) (name, dbURL string, drop func()) {
	b.Helper()
	admin := bigAdminURL(b)
	var r [6]byte
	_, _ = rand.Read(r[:])
	name = "bench_" + hex.EncodeToString(r[:])
	u, err := url.Parse(admin)
	if err != nil {
		b.Fatal(err)
	}
	u.Path = "/" + name
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := execOn(ctx, admin, "create database "+name+" template template0"); err != nil {
		b.Fatal(err)
	}
	var once sync.Once
	drop = func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := execOn(ctx, admin, "drop database if exists "+name+" with (force)"); err != nil {
				b.Errorf("drop database %s: %v", name, err)
			}
		})
	}
	b.Cleanup(drop)
	return name, u.String(), drop
}

func connConfig(b *testing.B, dbURL string) *pgx.ConnConfig {
	b.Helper()
	cc, err := pgx.ParseConfig(dbURL)
	if err != nil {
		b.Fatal(err)
	}
	return cc
}

// parallel runs f(0..n-1) with at most limit calls at a time and returns the first error.
func parallel(n, limit int, f func(i int) error) error {
	sem := make(chan struct{}, limit)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := f(i); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return first
}

// waitFor polls cond every 20ms until it is true or the timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, what string, cond func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		ok, err := cond()
		if err != nil {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", what, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Statistics over float64 samples.

// pct returns the p-th percentile (0..100) by nearest rank; NaN for no samples.
func pct(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	rank := int(math.Ceil(p / 100 * float64(len(s))))
	return s[min(max(rank, 1), len(s))-1]
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if n := len(s); n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[len(s)/2]
}

func minOf(xs []float64) float64 { return slices.Min(xs) }
func maxOf(xs []float64) float64 { return slices.Max(xs) }

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// spread formats the median of xs with its range: "12.3 (11.0–14.2)".
func spread(xs []float64, prec int) string {
	if len(xs) == 0 {
		return "-"
	}
	f := "%." + strconv.Itoa(prec) + "f"
	if len(xs) == 1 {
		return fmt.Sprintf(f, xs[0])
	}
	return fmt.Sprintf(f+" ("+f+"–"+f+")", median(xs), minOf(xs), maxOf(xs))
}

// table prints rows to stdout as a Markdown table under a title, so that a run can be pasted
// into BENCHMARKS.md as it is.
func table(title string, header []string, rows [][]string) {
	var sb strings.Builder
	w := tabwriter.NewWriter(&sb, 0, 0, 1, ' ', 0)
	line := func(cells []string) { fmt.Fprintln(w, "| "+strings.Join(cells, "\t| ")+"\t|") }
	line(header)
	dashes := make([]string, len(header))
	for i := range dashes {
		dashes[i] = "---"
	}
	line(dashes)
	for _, r := range rows {
		line(r)
	}
	_ = w.Flush()
	fmt.Printf("\n#### %s\n\n%s\n", title, sb.String())
}

// noteLoad prints the machine's load average, since other work on a 2-core machine shows in
// every figure.
func noteLoad(name string) {
	b, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("%s: load average %s", name, b)
}
