package bench

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/migrator"
)

// Measurement 2: from the commit of the slow lane's last migration to each replica knowing the
// lane is done, for 1 to 500 replicas in one process, each replica with its own connection(s),
// on the throwaway cluster. The commit time is the server's commit timestamp of the migration's
// transaction (track_commit_timestamp, read back with pg_xact_commit_timestamp on the version
// row); the driver also records when COMMIT returned on its side, to show the bias of that
// simpler reference.
//
// Designs, each on its own fresh database, one after the other:
//   - lanes: app.Runtime with defaults; knowing = its Done channel closed (View's DoneAt),
//     after the notification and the re-read of the version tables it triggers.
//   - bare: a pgx connection in LISTEN; knowing = WaitForNotification returned. The floor of
//     any LISTEN design on this machine, measured in the same run.
//   - poll: a pgx connection reading the version table once a second; knowing = the read that
//     first sees the new version.

type signalSize struct{ replicas, reps int }

func BenchmarkSignalLatency(b *testing.B) {
	noteLoad("SignalLatency")
	sizes := []signalSize{{1, reps(10, 3)}, {10, reps(5, 3)}, {100, reps(5, 2)}, {500, reps(3, 1)}}
	designs := []string{designLanes, designBare, designPoll}
	admin := bigAdminURL(b)
	var rows, costRows [][]string
	var biases []float64
	for _, size := range sizes {
		b.Run(fmt.Sprintf("replicas=%d", size.replicas), func(b *testing.B) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
			defer cancel()
			adminConn, err := pgx.Connect(ctx, admin)
			if err != nil {
				b.Fatal(err)
			}
			defer adminConn.Close(ctx)
			p50, p99, pmax := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
			stmts, execMS, connsPer, heap := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
			vias := map[string]int{}
			for range size.reps {
				for _, design := range designs {
					r := signalOnce(b, ctx, adminConn, design, size.replicas)
					p50[design] = append(p50[design], pct(r.latMS, 50))
					p99[design] = append(p99[design], pct(r.latMS, 99))
					pmax[design] = append(pmax[design], maxOf(r.latMS))
					stmts[design] = append(stmts[design], float64(r.stmts.calls)/float64(size.replicas))
					execMS[design] = append(execMS[design], r.stmts.execMS)
					connsPer[design] = append(connsPer[design], float64(r.conns)/float64(size.replicas))
					heap[design] = append(heap[design], r.heapKiB)
					biases = append(biases, r.biasMS)
					for k, v := range r.via {
						vias[k] += v
					}
				}
			}
			for _, design := range designs {
				b.ReportMetric(median(p50[design]), design+"-p50-ms")
				b.ReportMetric(median(p99[design]), design+"-p99-ms")
				rows = append(rows, []string{strconv.Itoa(size.replicas), design, strconv.Itoa(size.reps),
					spread(p50[design], 1), spread(p99[design], 1), spread(pmax[design], 1)})
				costRows = append(costRows, []string{strconv.Itoa(size.replicas), design,
					spread(connsPer[design], 2), spread(stmts[design], 2), spread(execMS[design], 1), spread(heap[design], 1)})
			}
			var vs []string
			for k, v := range vias {
				vs = append(vs, fmt.Sprintf("%s=%d", k, v))
			}
			sort.Strings(vs)
			b.Logf("replicas=%d: lanes replicas learned via %s", size.replicas, strings.Join(vs, ", "))
		})
	}
	table("Signal latency: ms from the commit (server commit timestamp) to each replica knowing; per run p50, p99 and max over the replicas, then the median over runs (min–max)",
		[]string{"replicas", "design", "runs", "p50", "p99", "max"}, rows)
	table("What the signal costs: server connections per replica while waiting; statements (pg_stat_statements) per replica and their total server execution time between the release and the last replica knowing; the client's live heap per replica that starting the group added",
		[]string{"replicas", "design", "connections per replica", "statements per replica", "server exec ms (all)", "client heap KiB per replica"}, costRows)
	fmt.Printf("Reference bias: COMMIT returned in the committing session %s ms after the server's commit timestamp (median, min–max over %d runs).\n",
		spread(biases, 2), len(biases))
}

type signalResult struct {
	latMS  []float64 // per replica, ms after the commit timestamp
	biasMS float64   // COMMIT returned on the driver's side minus the commit timestamp
	stmts  stmtStats // in the database from the release to the last replica knowing
	conns  int       // server connections to the database while waiting (driver excluded)
	// heapKiB is the client's live heap per replica that starting the group added.
	heapKiB float64
	via     map[string]int
}

func signalOnce(b *testing.B, ctx context.Context, admin *pgx.Conn, design string, n int) signalResult {
	db, dbURL, drop := bigDB(b)
	defer drop()
	cc := connConfig(b, dbURL)
	d, err := startDriver(ctx, cc)
	if err != nil {
		b.Fatal(err)
	}
	defer d.abort() // after finish, a no-op
	heap0 := liveHeap()
	g, err := startGroup(ctx, design, cc, n)
	if err != nil {
		b.Fatalf("%s: start %d replicas: %v", design, n, err)
	}
	defer g.close()
	time.Sleep(time.Second) // let the start-up queries end
	var res signalResult
	res.heapKiB = (float64(liveHeap()) - float64(heap0)) / float64(n) / 1024
	writeHeapProfile(b, design, n)
	if res.conns, err = connsOf(ctx, admin, db); err != nil {
		b.Fatal(err)
	}
	before, err := readStmtStats(ctx, admin, db)
	if err != nil {
		b.Fatal(err)
	}
	if debugStatements() {
		if _, err := admin.Exec(ctx, "select pg_stat_statements_reset(0, (select oid from pg_database where datname = $1), 0)", db); err != nil {
			b.Fatal(err)
		}
		before = stmtStats{}
	}
	stopProfile := startCPUProfile(b, design, n)
	if err := d.finish(); err != nil {
		b.Fatal(err)
	}
	err = waitFor(ctx, 20*time.Second, "every replica to learn", func() (bool, error) {
		for _, t := range g.learned() {
			if t.IsZero() {
				return false, nil
			}
		}
		return true, nil
	})
	stopProfile()
	if err != nil {
		b.Fatalf("%s, %d replicas: %v", design, n, err)
	}
	after, err := readStmtStats(ctx, admin, db)
	if err != nil {
		b.Fatal(err)
	}
	res.stmts = stmtStats{calls: after.calls - before.calls, execMS: after.execMS - before.execMS}
	if debugStatements() {
		printStatements(b, ctx, admin, db, fmt.Sprintf("%s, %d replicas, from the release to the last replica knowing", design, n))
	}
	commitTS := slowLaneCommitTime(b, ctx, cc)
	for _, t := range g.learned() {
		res.latMS = append(res.latMS, ms(t.Sub(commitTS)))
	}
	res.biasMS = ms(time.Unix(0, d.commitAt.Load()).Sub(commitTS))
	if rt, ok := g.(*runtimes); ok {
		res.via = rt.via()
	}
	return res
}

// BenchmarkReread times what a replica runs when a notification arrives: the full lane status
// (migrator.Status: version tables, the lane locks in pg_locks, the last history row) against
// a read of one version table, serially on one connection, on the test server (max_connections
// as configured there) and on the throwaway cluster (1300): pg_locks costs grow with
// max_connections.
func BenchmarkReread(b *testing.B) {
	noteLoad("Reread")
	const calls = 300
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	servers := []struct {
		name string
		url  func() string
	}{
		{"test server", func() string { return pgtest.NewDB(b) }},
		{"throwaway cluster", func() string { _, u, _ := bigDB(b); return u }},
	}
	var rows [][]string
	for _, srv := range servers {
		dbURL := srv.url()
		cc := connConfig(b, dbURL)
		m, err := migrator.New(cc, signalLanes(func(context.Context, pgx.Tx) error { return nil }), migrator.Config{})
		if err != nil {
			b.Fatal(err)
		}
		for _, lane := range []string{"fast", "slow"} {
			if _, err := m.Migrate(ctx, lane); err != nil {
				b.Fatal(err)
			}
		}
		conn, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			b.Fatal(err)
		}
		var maxConns string
		if err := conn.QueryRow(ctx, "show max_connections").Scan(&maxConns); err != nil {
			b.Fatal(err)
		}
		timeIt := func(f func() error) []float64 {
			var out []float64
			for range calls {
				t0 := time.Now()
				if err := f(); err != nil {
					b.Fatal(err)
				}
				out = append(out, float64(time.Since(t0).Microseconds()))
			}
			return out
		}
		status := timeIt(func() error { _, err := m.Status(ctx, conn); return err })
		version := timeIt(func() error {
			var v int32
			return conn.QueryRow(ctx, "select max(version) from lanes_slow_version").Scan(&v)
		})
		conn.Close(ctx)
		rows = append(rows, []string{srv.name, maxConns, fmt.Sprintf("%.0f", pct(status, 50)), fmt.Sprintf("%.0f", pct(status, 99)),
			fmt.Sprintf("%.0f", pct(version, 50)), fmt.Sprintf("%.0f", pct(version, 99))})
		b.ReportMetric(pct(status, 50), "status-µs-"+maxConns)
		b.ReportMetric(pct(version, 50), "version-µs-"+maxConns)
	}
	table(fmt.Sprintf("Re-read after a notification, one replica alone: µs per call over %d calls", calls),
		[]string{"server", "max_connections", "migrator.Status p50", "p99", "one version table p50", "p99"}, rows)
}

// slowLaneCommitTime reads when the server committed the slow lane's version (track_commit_timestamp
// is on in the throwaway cluster): the moment the latencies are measured from.
func slowLaneCommitTime(b *testing.B, ctx context.Context, cc *pgx.ConnConfig) time.Time {
	b.Helper()
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	var t time.Time
	if err := conn.QueryRow(ctx, "select pg_xact_commit_timestamp(xmin) from lanes_slow_version").Scan(&t); err != nil {
		b.Fatal(err)
	}
	return t
}
