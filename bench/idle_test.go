package bench

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Measurement 3: what waiting replicas cost. Groups of replicas of each design wait at the same
// time, each group in its own database of the throwaway cluster, so one counting window covers
// every design alike. After more than 10 s of quiet (pg_stat_database counters are flushed by
// an idle backend within about 10 s) the server's counts are read at the start and end of each
// fixed window: transactions committed (pg_stat_database.xact_commit, delayed by up to the
// flush interval at both ends, which cancels out in a steady state) and statements
// (pg_stat_statements calls, exact) and new sessions (pg_stat_database.sessions, connections
// opened). Client side: live heap (runtime.MemStats.HeapAlloc after a
// GC) and goroutines added per replica.
//
// Designs:
//   - lanes: app.Runtime with defaults, waiting while the driver holds the slow lane.
//   - lanes-TO30s: the same with TakeoverInterval 30s (the lock take-over tries are the cost).
//   - lanes-noTO: the same with TakeoverInterval 1h, so that only the listener remains.
//   - lanes-done: app.Runtime with defaults after both lanes are done (between deploys).
//   - poll: a connection reading the version table once a second, waiting like lanes.

type idleGroup struct {
	design   string
	replicas int
	db       string
	g        group
	d        *driver // already finished for lanes-done
	heap     float64 // bytes per replica
	gor      float64 // goroutines per replica
	conns    int
	xacts    []float64 // per window: transactions per second, all replicas
	sessions []float64 // per window: new server sessions (connections) per second
	stmts    []float64 // per window: statements per second, all replicas
	execMS   []float64 // per window: server execution ms per second, all replicas
}

func BenchmarkIdleCost(b *testing.B) {
	noteLoad("IdleCost")
	settle, window, windows := 12*time.Second, 30*time.Second, reps(3, 1)
	if quick() {
		window = 10 * time.Second
	}
	if s := envDuration("LANES_BENCH_WINDOW"); s > 0 {
		window = s
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	admin := bigAdminURL(b)
	adminConn, err := pgx.Connect(ctx, admin)
	if err != nil {
		b.Fatal(err)
	}
	defer adminConn.Close(ctx)

	var groups []*idleGroup
	defer func() {
		for _, ig := range groups {
			if ig.g != nil {
				ig.g.close()
			}
			ig.d.abort()
		}
	}()
	for _, n := range []int{10, 100} {
		for _, design := range []string{designLanes, designLanesTO30, designLanesNoTO, "lanes-done", designPoll} {
			ig := &idleGroup{design: design, replicas: n}
			var dbURL string
			ig.db, dbURL, _ = bigDB(b)
			cc := connConfig(b, dbURL)
			d, err := startDriver(ctx, cc)
			if err != nil {
				b.Fatal(err)
			}
			ig.d = d
			groups = append(groups, ig) // from here on, the deferred cleanup ends it
			start := design
			if design == "lanes-done" {
				if err := d.finish(); err != nil {
					b.Fatal(err)
				}
				start = designLanes
			}
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			g0 := runtime.NumGoroutine()
			if ig.g, err = startGroup(ctx, start, cc, n); err != nil {
				b.Fatalf("%s: %v", design, err)
			}
			time.Sleep(500 * time.Millisecond)
			runtime.GC()
			runtime.ReadMemStats(&after)
			ig.heap = float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(n)
			ig.gor = float64(runtime.NumGoroutine()-g0) / float64(n)
		}
	}
	time.Sleep(settle)
	for _, ig := range groups {
		if ig.conns, err = connsOf(ctx, adminConn, ig.db); err != nil {
			b.Fatal(err)
		}
	}
	for range windows {
		type counts struct {
			xacts, sessions int64
			stmts           stmtStats
		}
		read := func() map[*idleGroup]counts {
			out := map[*idleGroup]counts{}
			for _, ig := range groups {
				var c counts
				if err := adminConn.QueryRow(ctx, "select xact_commit, sessions from pg_stat_database where datname = $1", ig.db).Scan(&c.xacts, &c.sessions); err != nil {
					b.Fatal(err)
				}
				if c.stmts, err = readStmtStats(ctx, adminConn, ig.db); err != nil {
					b.Fatal(err)
				}
				out[ig] = c
			}
			return out
		}
		t0, c0 := time.Now(), read()
		time.Sleep(window)
		secs, c1 := time.Since(t0).Seconds(), read()
		for _, ig := range groups {
			ig.xacts = append(ig.xacts, float64(c1[ig].xacts-c0[ig].xacts)/secs)
			ig.sessions = append(ig.sessions, float64(c1[ig].sessions-c0[ig].sessions)/secs)
			ig.stmts = append(ig.stmts, float64(c1[ig].stmts.calls-c0[ig].stmts.calls)/secs)
			ig.execMS = append(ig.execMS, (c1[ig].stmts.execMS-c0[ig].stmts.execMS)/secs)
		}
	}
	if debugStatements() {
		for _, ig := range groups {
			printStatements(b, ctx, adminConn, ig.db, fmt.Sprintf("%s, %d replicas, whole run", ig.design, ig.replicas))
		}
	}
	var rows, clientRows [][]string
	perReplica := func(xs []float64, n int) []float64 {
		out := make([]float64, len(xs))
		for i, x := range xs {
			out[i] = x / float64(n)
		}
		return out
	}
	for _, ig := range groups {
		rows = append(rows, []string{ig.design, strconv.Itoa(ig.replicas),
			spread(ig.xacts, 2), spread(ig.stmts, 2), spread(perReplica(ig.stmts, ig.replicas), 3), spread(ig.execMS, 2), spread(ig.sessions, 2)})
		clientRows = append(clientRows, []string{ig.design, strconv.Itoa(ig.replicas),
			fmt.Sprintf("%.2f", float64(ig.conns)/float64(ig.replicas)),
			fmt.Sprintf("%.1f", ig.heap/1024), fmt.Sprintf("%.1f", ig.gor)})
		b.ReportMetric(median(ig.stmts), fmt.Sprintf("%s-%d-stmt/s", ig.design, ig.replicas))
	}
	table(fmt.Sprintf("Idle cost on the server: waiting replicas over %d window(s) of %v after %v of quiet; median (min–max) over windows", windows, window, settle),
		[]string{"design", "replicas", "transactions/s (pg_stat_database)", "statements/s (pg_stat_statements)", "statements/s per replica", "server exec ms/s", "new sessions/s"}, rows)
	table("Idle cost on the client: per replica",
		[]string{"design", "replicas", "server connections", "live heap KiB", "goroutines"}, clientRows)
}

func envDuration(name string) time.Duration {
	d, _ := time.ParseDuration(os.Getenv(name))
	return d
}
