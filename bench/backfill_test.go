package bench

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

// Measurement 7: batched backfills (issue 9). A backfill of N rows as one UPDATE and as a
// batched migration with the default settings, side by side on identical tables; the work
// redone after the applier's session dies at 50 %; how fresh the progress is on 100 replicas
// and what it costs in notifications; and the applier's heap at two table sizes.

// fillTable creates name(id int8 primary key, v int, pad text) with n rows and analyzes it.
func fillTable(ctx context.Context, conn *pgx.Conn, name string, n int) error {
	_, err := conn.Exec(ctx, fmt.Sprintf(`create table %s (id int8 primary key, v int not null default 0, pad text not null default repeat('x', 40));
insert into %s (id) select generate_series(1, %d)`, name, name, n))
	if err != nil {
		return err
	}
	_, err = conn.Exec(ctx, "vacuum analyze "+name)
	return err
}

func batchedLane(table string) migrator.Lane {
	return migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"001_backfill.sql": mapFile(
		"---- lanes: batch table=" + table + " key=id size=1000 ----\nupdate " + table + " set v = v + 1 where id > $1 and id <= $2;")}}
}

// txWatch samples, every 5 ms on its own connection, the age of the open transaction of the
// sessions named app and the batch size recorded in lanes_progress.
type txWatch struct {
	longest  time.Duration
	maxBatch int
	stop     chan struct{}
	done     chan struct{}
}

func watchTx(ctx context.Context, b *testing.B, cc *pgx.ConnConfig, app string) *txWatch {
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		b.Fatal(err)
	}
	w := &txWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		defer conn.Close(context.Background())
		for {
			var age *float64
			var batch *int
			_ = conn.QueryRow(ctx, `select (select max(extract(epoch from clock_timestamp() - xact_start)) from pg_stat_activity where application_name = $1 and state <> 'idle'),
  (select max(batch_size) from lanes_progress where finished_at is null)`, app).Scan(&age, &batch)
			if age != nil {
				w.longest = max(w.longest, time.Duration(*age*float64(time.Second)))
			}
			if batch != nil {
				w.maxBatch = max(w.maxBatch, *batch)
			}
			select {
			case <-w.stop:
				return
			case <-ctx.Done():
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	return w
}

func (w *txWatch) finish() { close(w.stop); <-w.done }

func BenchmarkBackfill(b *testing.B) {
	noteLoad("Backfill")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	n := 1_000_000
	if quick() {
		n = 200_000
	}

	// 1. One UPDATE vs the batched migration, on identical tables of one database, in
	// alternating order over the repetitions; autovacuum is off on both tables and a checkpoint
	// precedes each run, so neither design pays for the other's dead rows or dirty pages.
	b.Run(fmt.Sprintf("rows=%d/one_update_vs_batched", n), func(b *testing.B) {
		cc := connConfig(b, pgtest.NewDB(b))
		cc.RuntimeParams["application_name"] = "bench-backfill"
		conn, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close(context.Background())
		var oneTotal, oneLongest, batTotal, batLongest, batLocked, batTx []float64
		for rep := range reps(2, 1) {
			one, bat := fmt.Sprintf("bf_one_%d", rep), fmt.Sprintf("bf_batched_%d", rep)
			for _, t := range []string{one, bat} {
				if err := fillTable(ctx, conn, t, n); err != nil {
					b.Fatal(err)
				}
				if _, err := conn.Exec(ctx, "alter table "+t+" set (autovacuum_enabled = off)"); err != nil {
					b.Fatal(err)
				}
			}
			runOne := func() {
				if _, err := conn.Exec(ctx, "checkpoint"); err != nil {
					b.Fatal(err)
				}
				w := watchTx(ctx, b, cc, "bench-backfill")
				t0 := time.Now()
				if _, err := conn.Exec(ctx, "update "+one+" set v = v + 1"); err != nil {
					b.Fatal(err)
				}
				d := time.Since(t0)
				w.finish()
				oneTotal = append(oneTotal, d.Seconds())
				oneLongest = append(oneLongest, ms(max(w.longest, d)))
			}
			runBatched := func() {
				if _, err := conn.Exec(ctx, "checkpoint"); err != nil {
					b.Fatal(err)
				}
				lane := batchedLane(bat)
				lane.Name = fmt.Sprintf("slow_%d", rep)
				m, err := migrator.New(cc, []migrator.Lane{lane}, migrator.Config{})
				if err != nil {
					b.Fatal(err)
				}
				w := watchTx(ctx, b, cc, "bench-backfill")
				t0 := time.Now()
				if _, err := m.Migrate(ctx, lane.Name); err != nil {
					b.Fatal(err)
				}
				d := time.Since(t0)
				w.finish()
				var batches, wrong int
				if err := conn.QueryRow(ctx, "select batches, (select count(*) from "+bat+" where v <> 1) from lanes_progress where lane = $1", lane.Name).Scan(&batches, &wrong); err != nil || wrong != 0 {
					b.Fatalf("batched: %d rows not updated once (%v)", wrong, err)
				}
				batTotal = append(batTotal, d.Seconds())
				batLongest = append(batLongest, ms(w.longest))
				batLocked = append(batLocked, float64(w.maxBatch))
				batTx = append(batTx, float64(batches))
			}
			if rep%2 == 0 {
				runOne()
				runBatched()
			} else {
				runBatched()
				runOne()
			}
		}
		table(fmt.Sprintf("Backfill of %d rows: one UPDATE vs batched (defaults: target 200 ms)", n),
			[]string{"design", "total (s)", "longest transaction (ms)", "rows locked at once (at most)", "transactions"},
			[][]string{
				{"one UPDATE", spread(oneTotal, 2), spread(oneLongest, 0), fmt.Sprint(n), "1"},
				{"batched", spread(batTotal, 2), spread(batLongest, 0), spread(batLocked, 0), spread(batTx, 0)},
			})
		fmt.Printf("batched/one UPDATE total time: %.2fx (medians); longest batched transaction %.2fx the 200 ms target, %.3f of the batched run\n",
			median(batTotal)/median(oneTotal), median(batLongest)/200, median(batLongest)/1000/median(batTotal))
	})

	// 2. The applier's session dies at 50 %: what the next run redoes.
	b.Run(fmt.Sprintf("rows=%d/resume_after_kill_at_half", n), func(b *testing.B) {
		cc := connConfig(b, pgtest.NewDB(b))
		cc.RuntimeParams["application_name"] = "bench-resume"
		conn, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close(context.Background())
		if err := fillTable(ctx, conn, "bf", n); err != nil {
			b.Fatal(err)
		}
		m, err := migrator.New(cc, []migrator.Lane{batchedLane("bf")}, migrator.Config{})
		if err != nil {
			b.Fatal(err)
		}
		errc := make(chan error, 1)
		t0 := time.Now()
		go func() { _, err := m.Migrate(ctx, "slow"); errc <- err }()
		var atKill, sizeAtKill int
		if err := waitFor(ctx, 10*time.Minute, "half walked", func() (bool, error) {
			var exists bool
			if err := conn.QueryRow(ctx, "select to_regclass('lanes_progress') is not null").Scan(&exists); err != nil || !exists {
				return false, err
			}
			err := conn.QueryRow(ctx, "select coalesce((select done from lanes_progress), 0), coalesce((select batch_size from lanes_progress), 0)").Scan(&atKill, &sizeAtKill)
			return atKill >= n/2, err
		}); err != nil {
			b.Fatal(err)
		}
		// The server-side view of a SIGKILL: the applier's session ends in the middle of a batch.
		if _, err := conn.Exec(ctx, "select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'bench-resume' and pid <> pg_backend_pid()"); err != nil {
			b.Fatal(err)
		}
		if err := <-errc; err == nil {
			b.Fatal("the applier survived")
		}
		first := time.Since(t0)
		var committed int
		if err := conn.QueryRow(ctx, "select done from lanes_progress").Scan(&committed); err != nil {
			b.Fatal(err)
		}
		t0 = time.Now()
		if _, err := m.Migrate(ctx, "slow"); err != nil {
			b.Fatal(err)
		}
		second := time.Since(t0)
		var twice, never int
		if err := conn.QueryRow(ctx, "select count(*) filter (where v > 1), count(*) filter (where v = 0) from bf").Scan(&twice, &never); err != nil {
			b.Fatal(err)
		}
		table(fmt.Sprintf("Resume after the applier's session is killed at 50 %% of %d rows", n),
			[]string{"committed at the kill", "batch size then", "rows updated twice", "rows never updated", "first run (s)", "resumed run (s)"},
			[][]string{{fmt.Sprint(committed), fmt.Sprint(sizeAtKill), fmt.Sprint(twice), fmt.Sprint(never),
				fmt.Sprintf("%.2f", first.Seconds()), fmt.Sprintf("%.2f", second.Seconds())}})
		fmt.Printf("work redone: at most the batch in flight (%d rows, rolled back); committed batches redone: %d rows\n", sizeAtKill, twice)
	})

	// 3. Progress freshness on 100 replicas and the notifications it costs.
	b.Run("replicas=100/progress_freshness", func(b *testing.B) {
		replicas := 100
		rows := n
		_, dbURL, _ := bigDB(b)
		cc := connConfig(b, dbURL)
		conn, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close(context.Background())
		if err := fillTable(ctx, conn, "bf", rows); err != nil {
			b.Fatal(err)
		}
		lane := batchedLane("bf")
		// Every replica gets the same lanes; one wins the lane, the others follow it.
		rts := make([]*app.Runtime, replicas)
		for i := range rts {
			m, err := migrator.New(cc, []migrator.Lane{lane}, migrator.Config{Batch: migrator.BatchConfig{Pause: 20 * time.Millisecond}})
			if err != nil {
				b.Fatal(err)
			}
			r, err := app.New(m, app.Config{})
			if err != nil {
				b.Fatal(err)
			}
			defer r.Close()
			rts[i] = r
		}
		// Count the progress notifications on a listener of our own.
		lconn, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			b.Fatal(err)
		}
		defer lconn.Close(context.Background())
		if _, err := lconn.Exec(ctx, "listen lanes_done"); err != nil {
			b.Fatal(err)
		}
		var hints atomic.Int64
		lctx, lcancel := context.WithCancel(ctx)
		var lwg sync.WaitGroup
		lwg.Go(func() {
			for {
				nt, err := lconn.WaitForNotification(lctx)
				if err != nil {
					return
				}
				if ev, err := wire.Parse(nt.Payload); err == nil && ev.Progress != nil {
					hints.Add(1)
				}
			}
		})
		if err := parallel(replicas, 10, func(i int) error { return rts[i].Start(ctx) }); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		// Sample every replica that is not applying every 100 ms: the age of its progress.
		var ages []float64
		var missing int
		for {
			done := true
			now := time.Now()
			for _, r := range rts {
				if r.IsDone("slow") {
					continue
				}
				done = false
				if known := r.View().Lanes[0]; known.Role == "applying" {
					continue
				}
				if p := r.Progress("slow"); p != nil && p.Done > 0 {
					ages = append(ages, now.Sub(p.UpdatedAt).Seconds())
				} else if time.Since(t0) > 3*time.Second {
					missing++
				}
			}
			if done {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		var walkS float64
		if err := conn.QueryRow(ctx, "select extract(epoch from finished_at - started_at)::float8 from lanes_progress").Scan(&walkS); err != nil {
			b.Fatal(err)
		}
		walk := time.Duration(walkS * float64(time.Second))
		lcancel()
		lwg.Wait()
		table(fmt.Sprintf("Progress on %d replicas during a %.0f s batched migration of %d rows", replicas, walk.Seconds(), rows),
			[]string{"samples", "age p50 (s)", "age p99 (s)", "age max (s)", "samples without progress after 3 s", "progress notifications", "per second"},
			[][]string{{fmt.Sprint(len(ages)), fmt.Sprintf("%.2f", pct(ages, 50)), fmt.Sprintf("%.2f", pct(ages, 99)), fmt.Sprintf("%.2f", pct(ages, 100)),
				fmt.Sprint(missing), fmt.Sprint(hints.Load()), fmt.Sprintf("%.2f", float64(hints.Load())/walk.Seconds())}})
	})

	// 4. The applier's heap does not grow with the table.
	b.Run("heap", func(b *testing.B) {
		sizes := []int{1_000_000, 10_000_000}
		if quick() {
			sizes = []int{200_000, 1_000_000}
		}
		var rowsOut [][]string
		for _, size := range sizes {
			cc := connConfig(b, pgtest.NewDB(b))
			conn, err := pgx.ConnectConfig(ctx, cc)
			if err != nil {
				b.Fatal(err)
			}
			if err := fillTable(ctx, conn, "bf", size); err != nil {
				b.Fatal(err)
			}
			conn.Close(context.Background())
			m, err := migrator.New(cc, []migrator.Lane{batchedLane("bf")}, migrator.Config{})
			if err != nil {
				b.Fatal(err)
			}
			runtime.GC()
			var base runtime.MemStats
			runtime.ReadMemStats(&base)
			stop := make(chan struct{})
			var peak uint64
			var wg sync.WaitGroup
			wg.Go(func() {
				var ms runtime.MemStats
				for {
					runtime.ReadMemStats(&ms)
					peak = max(peak, ms.HeapInuse)
					select {
					case <-stop:
						return
					case <-time.After(20 * time.Millisecond):
					}
				}
			})
			t0 := time.Now()
			if _, err := m.Migrate(ctx, "slow"); err != nil {
				b.Fatal(err)
			}
			took := time.Since(t0)
			close(stop)
			wg.Wait()
			runtime.GC()
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			rowsOut = append(rowsOut, []string{fmt.Sprint(size), fmt.Sprintf("%.1f", took.Seconds()), fmt.Sprintf("%.2f", float64(base.HeapInuse)/(1<<20)),
				fmt.Sprintf("%.2f", float64(peak)/(1<<20)), fmt.Sprintf("%.2f", float64(after.HeapInuse)/(1<<20))})
		}
		table("The applier's heap during a batched migration", []string{"rows", "walk (s)", "heap in use before (MiB)", "peak (MiB)", "after, GC (MiB)"}, rowsOut)
	})
}
