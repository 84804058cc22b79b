package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/backoff"
	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/migrator"
)

// Measurement 9 (issue 11): what N replicas cost the server while they wait for a slow lane
// another replica applies, for 20 and 500 waiters, with the takeover scheme of today beside the
// one it replaced, in the same run. Each group waits in its own database of the throwaway
// cluster while a driver holds the slow lane's migration open; after more than 10 s of quiet,
// pg_stat_statements counts the statements of each database over fixed windows (the driver's
// own are none: it sits in its migration).
//
// Designs:
//   - lanes: app.Runtime with defaults: one designated successor checks the lane's lock every
//     second, the other waiters try to become the successor about once per 4 s between them all.
//   - every-waiter-checks: the scheme before issue 11, reproduced with bare connections: every
//     waiting replica's listener runs the same lock check statement every 5 s (±20 %), in
//     place of its ping. (Its one-minute backstop, a new session and a migration attempt per
//     replica per minute, is left out: the figures favour it.)
func BenchmarkWaitersCost(b *testing.B) {
	noteLoad("WaitersCost")
	settle, window, windows := 12*time.Second, 30*time.Second, reps(3, 1)
	if quick() {
		window = 10 * time.Second
	}
	if s := envDuration("LANES_BENCH_WINDOW"); s > 0 {
		window = s
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	adminConn, err := pgx.Connect(ctx, bigAdminURL(b))
	if err != nil {
		b.Fatal(err)
	}
	defer adminConn.Close(ctx)

	type waitGroup struct {
		design   string
		replicas int
		db       string
		g        group
		d        *driver
		conns    int
		stmts    []float64
	}
	var groups []*waitGroup
	defer func() {
		for _, wg := range groups {
			if wg.g != nil {
				wg.g.close()
			}
			wg.d.abort()
		}
	}()
	for _, n := range []int{20, 500} {
		for _, design := range []string{designLanes, designEveryWaiter} {
			wg := &waitGroup{design: design, replicas: n}
			var dbURL string
			wg.db, dbURL, _ = bigDB(b)
			cc := connConfig(b, dbURL)
			if wg.d, err = startDriver(ctx, cc); err != nil {
				b.Fatal(err)
			}
			groups = append(groups, wg)
			switch design {
			case designLanes:
				wg.g, err = startRuntimes(ctx, cc, n, app.Config{})
			case designEveryWaiter:
				wg.g, err = startEveryWaiter(ctx, cc, n)
			}
			if err != nil {
				b.Fatalf("%s: %v", design, err)
			}
		}
	}
	time.Sleep(settle)
	for _, wg := range groups {
		if wg.conns, err = connsOf(ctx, adminConn, wg.db); err != nil {
			b.Fatal(err)
		}
	}
	for range windows {
		read := func() map[*waitGroup]stmtStats {
			out := map[*waitGroup]stmtStats{}
			for _, wg := range groups {
				s, err := readStmtStats(ctx, adminConn, wg.db)
				if err != nil {
					b.Fatal(err)
				}
				out[wg] = s
			}
			return out
		}
		t0, c0 := time.Now(), read()
		time.Sleep(window)
		secs, c1 := time.Since(t0).Seconds(), read()
		for _, wg := range groups {
			wg.stmts = append(wg.stmts, float64(c1[wg].calls-c0[wg].calls)/secs)
		}
	}
	if debugStatements() {
		for _, wg := range groups {
			printStatements(b, ctx, adminConn, wg.db, fmt.Sprintf("%s, %d waiters, whole run", wg.design, wg.replicas))
		}
	}
	var rows [][]string
	for _, wg := range groups {
		per := make([]float64, len(wg.stmts))
		for i, x := range wg.stmts {
			per[i] = x / float64(wg.replicas)
		}
		rows = append(rows, []string{wg.design, strconv.Itoa(wg.replicas), spread(wg.stmts, 2), spread(per, 4),
			fmt.Sprintf("%.2f", float64(wg.conns)/float64(wg.replicas))})
		b.ReportMetric(median(wg.stmts), fmt.Sprintf("%s-%d-stmt/s", wg.design, wg.replicas))
	}
	table(fmt.Sprintf("Waiting replicas: server statements over %d window(s) of %v after %v of quiet; median (min–max) over windows", windows, window, settle),
		[]string{"design", "waiters", "statements/s, all waiters (pg_stat_statements)", "per waiter", "server connections per waiter"}, rows)
}

// designEveryWaiter is the takeover scheme before issue 11, reproduced with bare connections.
const designEveryWaiter = "every-waiter-checks"

// startEveryWaiter starts n LISTEN connections that each run the old lock check every 5 s
// (±20 %), as every waiting app.Runtime did before issue 11.
func startEveryWaiter(ctx context.Context, cc *pgx.ConnConfig, n int) (*conns, error) {
	m, err := migrator.New(cc, signalLanes(waitForever), migrator.Config{})
	if err != nil {
		return nil, err
	}
	key, err := engine.ApplierLockKey(m, "slow")
	if err != nil {
		return nil, err
	}
	return startConns(ctx, cc, n,
		func(ctx context.Context, c *pgx.Conn) error {
			_, err := c.Exec(ctx, "listen "+migrator.DefaultChannel)
			return err
		},
		func(ctx context.Context, c *pgx.Conn, learned func(time.Time)) {
			t := time.NewTimer(time.Duration(rand.Int64N(int64(5 * time.Second))))
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				t.Reset(backoff.Jitter(5 * time.Second))
				var free bool
				if err := c.QueryRow(ctx, "select case when pg_try_advisory_lock($1) then pg_advisory_unlock($1) else false end", key).Scan(&free); err != nil {
					return
				}
			}
		})
}
