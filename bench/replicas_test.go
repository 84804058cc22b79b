package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/migrator"
)

// Shared by the signal-latency and idle-cost benchmarks: a driver that holds the slow lane's
// only migration open until released, and groups of waiting replicas of several designs.

// signalLanes has a one-file fast lane and a slow lane whose only migration is the Go
// function up.
func signalLanes(up migrator.TxFunc) []migrator.Lane {
	return []migrator.Lane{
		{Name: "fast", Mode: migrator.Blocking, FS: fstest.MapFS{"001_create_example.sql": mapFile("create table example (id int primary key);")}},
		{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{{Version: 1, Name: "load_example", Up: up}}},
	}
}

// waitForever is the slow migration of the waiting replicas: they must never run it (the driver
// holds the lane), and if one ever did it would wait until closed.
func waitForever(ctx context.Context, _ pgx.Tx) error {
	<-ctx.Done()
	return ctx.Err()
}

// driver applies the fast lane, then runs the slow lane's migration in the background and
// holds it (inside its transaction, under the lane's lock) until release. finish and abort may
// each be called any number of times, in any order.
type driver struct {
	entered     chan struct{}
	release     chan struct{}
	releaseOnce sync.Once
	finished    chan struct{} // closed when the slow lane's Migrate returned; err is then set
	err         error
	commitAt    atomic.Int64 // unix ns just after the last COMMIT returned on the driver's connections
	stop        context.CancelFunc
}

func startDriver(ctx context.Context, cc *pgx.ConnConfig) (*driver, error) {
	d := &driver{entered: make(chan struct{}), release: make(chan struct{}), finished: make(chan struct{})}
	cc = cc.Copy()
	cc.Tracer = commitTracer{d}
	cc.User = driverRole
	m, err := migrator.New(cc, signalLanes(d.gate), migrator.Config{})
	if err != nil {
		return nil, err
	}
	if _, err := m.Migrate(ctx, "fast"); err != nil {
		return nil, err
	}
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	d.stop = cancel
	go func() {
		defer close(d.finished)
		_, d.err = m.Migrate(rctx, "slow")
	}()
	select {
	case <-d.entered:
		return d, nil
	case <-d.finished:
		cancel()
		return nil, fmt.Errorf("driver: slow lane ended before its migration started: %v", d.err)
	case <-time.After(30 * time.Second):
		d.abort()
		return nil, errors.New("driver: slow migration did not start")
	}
}

func (d *driver) gate(ctx context.Context, _ pgx.Tx) error {
	close(d.entered)
	select {
	case <-d.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// finish releases the migration and waits for the lane to be applied.
func (d *driver) finish() error {
	d.releaseOnce.Do(func() { close(d.release) })
	select {
	case <-d.finished:
		d.stop()
		return d.err
	case <-time.After(30 * time.Second):
		d.abort()
		return errors.New("driver: slow lane not applied 30s after release")
	}
}

// abort cancels the held migration (it rolls back) and waits for the driver to end.
func (d *driver) abort() {
	d.stop()
	<-d.finished
}

// commitTracer records when COMMIT returns on the driver's connections.
type commitTracer struct{ d *driver }

type sqlKey struct{}

func (t commitTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	return context.WithValue(ctx, sqlKey{}, data.SQL)
}

func (t commitTracer) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryEndData) {
	if s, _ := ctx.Value(sqlKey{}).(string); s == "commit" && data.Err == nil {
		t.d.commitAt.Store(time.Now().UnixNano())
	}
}

// group is a set of n waiting replicas of one design. learned returns, per replica, when it
// learned that the slow lane is done (zero while it has not).
type group interface {
	learned() []time.Time
	close()
}

// Design names.
const (
	designLanes     = "lanes"       // app.Runtime, defaults
	designLanesTO30 = "lanes-TO30s" // app.Runtime, TakeoverInterval 30s
	designLanesNoTO = "lanes-noTO"  // app.Runtime, TakeoverInterval 1h: the listener alone
	designLanesKeep = "lanes-keep"  // app.Runtime, KeepListening: the listener stays once done
	designBare      = "bare"        // a pgx connection in LISTEN, WaitForNotification, nothing else
	designPoll      = "poll"        // a pgx connection polling the version table once a second
)

func startGroup(ctx context.Context, design string, cc *pgx.ConnConfig, n int) (group, error) {
	var (
		g   group
		err error
	)
	switch design {
	case designLanes:
		g, err = startRuntimes(ctx, cc, n, app.Config{})
	case designLanesTO30:
		g, err = startRuntimes(ctx, cc, n, app.Config{TakeoverInterval: 30 * time.Second})
	case designLanesKeep:
		g, err = startRuntimes(ctx, cc, n, app.Config{KeepListening: true})
	case designLanesNoTO:
		g, err = startRuntimes(ctx, cc, n, app.Config{TakeoverInterval: time.Hour})
	case designBare:
		g, err = startBare(ctx, cc, n)
	case designPoll:
		g, err = startPollers(ctx, cc, n)
	default:
		err = fmt.Errorf("unknown design %q", design)
	}
	if err != nil {
		return nil, err // not a group interface holding a nil pointer
	}
	return g, nil
}

// runtimes are multi-lanes replicas. at caches when each learned: learned is polled every
// 20 ms while a thousand replicas learn, and View (a copy of everything the replica knows) for
// each of them on every poll took CPU from the replicas being measured; IsDone is one mutex.
type runtimes struct {
	rs []*app.Runtime
	at []time.Time
}

func startRuntimes(ctx context.Context, cc *pgx.ConnConfig, n int, cfg app.Config) (*runtimes, error) {
	g := &runtimes{rs: make([]*app.Runtime, n), at: make([]time.Time, n)}
	// A thousand replicas starting on two loaded cores: a listener's connect, LISTEN and probe
	// can outlast its 5 s budget (seen at load 40-50); retry it as `lanes serve` does.
	cfg.WaitForDatabase = true
	err := parallel(n, 8, func(i int) error {
		m, err := migrator.New(cc, signalLanes(waitForever), migrator.Config{})
		if err != nil {
			return err
		}
		r, err := app.New(m, cfg)
		if err != nil {
			return err
		}
		if err := r.Start(ctx); err != nil {
			_ = r.Close()
			return err
		}
		g.rs[i] = r
		return nil
	})
	if err != nil {
		g.close()
		return nil, err
	}
	return g, nil
}

// learned is called by one goroutine at a time.
func (g *runtimes) learned() []time.Time {
	for i, r := range g.rs {
		if !g.at[i].IsZero() || !r.IsDone("slow") {
			continue
		}
		for _, l := range r.View().Lanes {
			if l.Name == "slow" && l.DoneAt != nil {
				g.at[i] = *l.DoneAt
			}
		}
	}
	return append([]time.Time(nil), g.at...)
}

// via counts how the replicas learned the lane was done.
func (g *runtimes) via() map[string]int {
	out := map[string]int{}
	for _, r := range g.rs {
		for _, l := range r.View().Lanes {
			if l.Name == "slow" && l.Done {
				out[l.Via]++
			}
		}
	}
	return out
}

func (g *runtimes) close() {
	_ = parallel(len(g.rs), 32, func(i int) error {
		if g.rs[i] != nil {
			return g.rs[i].Close()
		}
		return nil
	})
}

// conns is n pgx connections, each owned by one goroutine that records when it learned.
type conns struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	at     []time.Time
}

func (g *conns) learned() []time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]time.Time(nil), g.at...)
}

func (g *conns) set(i int, t time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.at[i] = t
}

func (g *conns) close() {
	g.cancel()
	g.wg.Wait()
}

// startConns connects n connections (prepare runs on each) and then runs loop on each in its
// own goroutine until the group is closed.
func startConns(ctx context.Context, cc *pgx.ConnConfig, n int, prepare func(ctx context.Context, c *pgx.Conn) error,
	loop func(ctx context.Context, c *pgx.Conn, learned func(time.Time))) (*conns, error) {
	g := &conns{at: make([]time.Time, n)}
	cs := make([]*pgx.Conn, n)
	err := parallel(n, 8, func(i int) error {
		c, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			return err
		}
		cs[i] = c
		return prepare(ctx, c)
	})
	if err != nil {
		for _, c := range cs {
			if c != nil {
				_ = c.Close(ctx)
			}
		}
		return nil, err
	}
	lctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	g.cancel = cancel
	for i, c := range cs {
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			defer c.Close(context.Background())
			loop(lctx, c, func(t time.Time) { g.set(i, t) })
		}()
	}
	return g, nil
}

// startBare: LISTEN on the lanes channel and wait for the notification that the slow lane is
// done (the applier's progress announcements, once a second while it runs, are skipped); no
// re-read.
func startBare(ctx context.Context, cc *pgx.ConnConfig, n int) (*conns, error) {
	return startConns(ctx, cc, n,
		func(ctx context.Context, c *pgx.Conn) error {
			_, err := c.Exec(ctx, "listen "+migrator.DefaultChannel)
			return err
		},
		func(ctx context.Context, c *pgx.Conn, learned func(time.Time)) {
			for {
				n, err := c.WaitForNotification(ctx)
				if err != nil {
					return
				}
				if strings.Contains(n.Payload, `"state":"done"`) {
					learned(time.Now())
					<-ctx.Done()
					return
				}
			}
		})
}

// startPollers: read the slow lane's version table once a second (each poller at its own
// phase) until it holds the lane's last version.
func startPollers(ctx context.Context, cc *pgx.ConnConfig, n int) (*conns, error) {
	const q = `select version from lanes_slow_version`
	return startConns(ctx, cc, n,
		func(context.Context, *pgx.Conn) error { return nil },
		func(ctx context.Context, c *pgx.Conn, learned func(time.Time)) {
			t := time.NewTimer(time.Duration(rand.Int64N(int64(time.Second))))
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				t.Reset(time.Second)
				var v int32
				if err := c.QueryRow(ctx, q).Scan(&v); err == nil && v >= 1 {
					learned(time.Now())
					<-ctx.Done()
					return
				}
			}
		})
}

// stmtStats is the server's count of statements and their execution time for one database,
// from pg_stat_statements (exact, not delayed like pg_stat_database), the driver's excluded.
type stmtStats struct {
	calls  int64
	execMS float64
}

func readStmtStats(ctx context.Context, admin *pgx.Conn, db string) (stmtStats, error) {
	var s stmtStats
	err := admin.QueryRow(ctx, `select coalesce(sum(calls), 0)::int8, coalesce(sum(total_exec_time), 0)::float8
from pg_stat_statements where dbid = (select oid from pg_database where datname = $1)
  and userid <> (select oid from pg_roles where rolname = $2)`, db, driverRole).Scan(&s.calls, &s.execMS)
	return s, err
}

// connsOf counts the server connections open to a database, the driver's excluded.
func connsOf(ctx context.Context, admin *pgx.Conn, db string) (int, error) {
	var n int
	err := admin.QueryRow(ctx, "select count(*) from pg_stat_activity where datname = $1 and usename <> $2", db, driverRole).Scan(&n)
	return n, err
}

// debugStatements: LANES_BENCH_STATEMENTS=1 prints the statements behind the figures.
func debugStatements() bool { return os.Getenv("LANES_BENCH_STATEMENTS") == "1" }

// printStatements prints the statements of the database by total execution time.
func printStatements(b *testing.B, ctx context.Context, admin *pgx.Conn, db, title string) {
	rows, err := admin.Query(ctx, `select calls, total_exec_time, mean_exec_time, left(regexp_replace(query, '\s+', ' ', 'g'), 110)
from pg_stat_statements where dbid = (select oid from pg_database where datname = $1)
  and userid <> (select oid from pg_roles where rolname = $2)
order by total_exec_time desc limit 8`, db, driverRole)
	if err != nil {
		b.Fatal(err)
	}
	var out [][]string
	for rows.Next() {
		var calls int64
		var total, mean float64
		var q string
		if err := rows.Scan(&calls, &total, &mean, &q); err != nil {
			b.Fatal(err)
		}
		out = append(out, []string{strconv.FormatInt(calls, 10), fmt.Sprintf("%.1f", total), fmt.Sprintf("%.3f", mean), "`" + q + "`"})
	}
	if err := rows.Err(); err != nil {
		b.Fatal(err)
	}
	table("Statements: "+title, []string{"calls", "total ms", "mean ms", "query"}, out)
}
