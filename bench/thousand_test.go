package bench

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Measurement 11 (issue 11): 1,000 replicas in one process on the throwaway cluster, beside
// 1,000 bare pgx listeners, in the same run (alternating, each group on a fresh database): every
// replica learns the completion; latency from the commit (server commit timestamp) to each
// replica knowing, p50 and p99; the statements the server ran from the release to the last
// replica knowing; server connections while waiting; and the client's live heap per replica
// (after a GC, what starting the group added).
func BenchmarkThousandReplicas(b *testing.B) {
	noteLoad("ThousandReplicas")
	const n = 1000
	runs := reps(3, 1)
	designs := []string{designLanes, designLanesKeep, designBare}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	adminConn, err := pgx.Connect(ctx, bigAdminURL(b))
	if err != nil {
		b.Fatal(err)
	}
	defer adminConn.Close(ctx)
	p50, p99, stmts, conns, heap := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	for run := range runs {
		// Each run starts with another design, so that none always runs first (on a server
		// and a process whose state the earlier groups of the run changed) or last.
		for k := range designs {
			design := designs[(run+k)%len(designs)]
			r := signalOnce(b, ctx, adminConn, design, n)
			if len(r.latMS) != n {
				b.Fatalf("%s: %d of %d replicas learned", design, len(r.latMS), n)
			}
			p50[design] = append(p50[design], pct(r.latMS, 50))
			p99[design] = append(p99[design], pct(r.latMS, 99))
			stmts[design] = append(stmts[design], float64(r.stmts.calls))
			conns[design] = append(conns[design], float64(r.conns)/n)
			heap[design] = append(heap[design], r.heapKiB)
		}
	}
	// The goal compares lanes with bare listeners run by run (same minutes, same load). The
	// results are kept by design, in run order.
	var ratios []float64
	for i := range p99[designBare] {
		ratios = append(ratios, p99[designLanes][i]/p99[designBare][i])
	}
	var rows [][]string
	for _, design := range designs {
		rows = append(rows, []string{design, strconv.Itoa(n), strconv.Itoa(runs), spread(p50[design], 1), spread(p99[design], 1),
			spread(stmts[design], 0), spread(conns[design], 2), spread(heap[design], 1)})
		b.ReportMetric(median(p99[design]), design+"-p99-ms")
	}
	b.ReportMetric(median(ratios), "p99-ratio")
	table(fmt.Sprintf("%d replicas in one process: ms from the commit to each replica knowing (p50, p99 over the replicas; median (min–max) over runs); server statements from the release to the last replica knowing (all replicas); server connections per replica while waiting; live heap KiB per replica; p99 lanes / bare per run: %s", n, spread(ratios, 2)),
		[]string{"design", "replicas", "runs", "p50 ms", "p99 ms", "statements at completion", "connections per replica", "heap KiB per replica"}, rows)
}

// liveHeap returns the live heap after a GC.
func liveHeap() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

func init() {
	if os.Getenv("LANES_BENCH_HEAPPROFILE") != "" {
		runtime.MemProfileRate = 256 // every allocation's site, near enough, not one in 512 KiB
	}
}

// writeHeapProfile writes the live heap, just measured for a group of n replicas of design, to
// $LANES_BENCH_HEAPPROFILE.design-n.pprof when that variable is set: what each replica keeps
// (go tool pprof -sample_index=inuse_space).
func writeHeapProfile(b *testing.B, design string, n int) {
	prefix := os.Getenv("LANES_BENCH_HEAPPROFILE")
	if prefix == "" {
		return
	}
	f, err := os.Create(fmt.Sprintf("%s.%s-%d.pprof", prefix, design, n))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		b.Fatal(err)
	}
}

// startCPUProfile profiles the process from the release of the lane to the last replica
// knowing, into $LANES_BENCH_CPUPROFILE.design-n.pprof when that variable is set (one file per
// group: the last run's). It returns the function that stops it.
func startCPUProfile(b *testing.B, design string, n int) func() {
	prefix := os.Getenv("LANES_BENCH_CPUPROFILE")
	if prefix == "" {
		return func() {}
	}
	f, err := os.Create(fmt.Sprintf("%s.%s-%d.pprof", prefix, design, n))
	if err != nil {
		b.Fatal(err)
	}
	// The window is tens of milliseconds: sample at 2 kHz rather than pprof's 100 Hz
	// (StartCPUProfile then warns that the rate is already set, and keeps it).
	runtime.SetCPUProfileRate(2000)
	if err := pprof.StartCPUProfile(f); err != nil {
		b.Fatal(err)
	}
	return func() {
		pprof.StopCPUProfile()
		_ = f.Close()
	}
}
