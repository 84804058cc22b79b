package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/migrator"
)

// Measurement 12 (issue 11): 30 separate `lanes wait --lane slow` processes beside 30 bare
// listener processes, in the same run (alternating, each group on a fresh database of the
// throwaway cluster): every process is started and listening before the driver commits the
// slow lane; the latency of a process is when it exited (its Wait returned here) minus the
// server's commit timestamp. The bare listener is this test binary run again
// (LANES_BENCH_BARE_LISTENER): connect, LISTEN, wait for the done payload, exit; the floor of a
// process that learns through LISTEN on this machine.
func BenchmarkWaitProcesses(b *testing.B) {
	noteLoad("WaitProcesses")
	const n = 30
	runs := reps(5, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	adminConn, err := pgx.Connect(ctx, bigAdminURL(b))
	if err != nil {
		b.Fatal(err)
	}
	defer adminConn.Close(ctx)
	lanesBin := buildLanes(b)
	self, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	for name, sql := range map[string]string{
		"fast/001_create_example.sql": "create table example (id int primary key);",
		"slow/001_load_example.sql":   "select 1;",
	} {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(sql), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	designs := map[string]func(dbURL string) *exec.Cmd{
		"lanes wait": func(dbURL string) *exec.Cmd {
			c := exec.Command(lanesBin, "wait", "--lane", "slow", "--timeout", "5m")
			c.Env = append(os.Environ(), "DATABASE_URL="+dbURL, "LANES_MIGRATIONS="+dir, "LANES_LOG_FORMAT=json")
			return c
		},
		"bare listener": func(dbURL string) *exec.Cmd {
			c := exec.Command(self)
			c.Env = append(os.Environ(), "LANES_BENCH_BARE_LISTENER="+dbURL)
			return c
		},
	}
	// Ready when the process says it listens: lanes wait after LISTEN and its first read.
	readyLine := map[string]string{"lanes wait": "waiting for the lane through LISTEN/NOTIFY", "bare listener": "listening"}
	order := []string{"lanes wait", "bare listener"}
	p50, p99, pmax := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	for rep := range runs {
		ds := order
		if rep%2 == 1 {
			ds = []string{order[1], order[0]}
		}
		for _, design := range ds {
			lat := waitProcessesOnce(b, ctx, designs[design], readyLine[design], n)
			p50[design] = append(p50[design], pct(lat, 50))
			p99[design] = append(p99[design], pct(lat, 99))
			pmax[design] = append(pmax[design], maxOf(lat))
		}
	}
	var rows [][]string
	for _, design := range order {
		rows = append(rows, []string{design, strconv.Itoa(n), strconv.Itoa(runs), spread(p50[design], 1), spread(p99[design], 1), spread(pmax[design], 1)})
	}
	var ratios []float64
	for i := range p50["lanes wait"] {
		ratios = append(ratios, p50["lanes wait"][i]/p50["bare listener"][i])
	}
	table(fmt.Sprintf("%d processes: ms from the commit (server commit timestamp) to each process's exit; per run p50, p99 and max over the processes, then the median over runs (min–max); p50 lanes wait / bare per run: %s", n, spread(ratios, 2)),
		[]string{"design", "processes", "runs", "p50 ms", "p99 ms", "max ms"}, rows)
	b.ReportMetric(median(ratios), "p50-ratio")
}

// waitProcessesOnce runs n processes of one design against a fresh database while the driver
// holds the slow lane, releases it once every process listens, and returns each process's exit
// time after the commit, ms.
func waitProcessesOnce(b *testing.B, ctx context.Context, start func(dbURL string) *exec.Cmd, readyLine string, n int) []float64 {
	_, dbURL, drop := bigDB(b)
	defer drop()
	cc := connConfig(b, dbURL)
	d, err := startDriver(ctx, cc)
	if err != nil {
		b.Fatal(err)
	}
	defer d.abort()
	type proc struct {
		cmd    *exec.Cmd
		exitAt time.Time
		err    error
		out    strings.Builder
	}
	procs := make([]*proc, n)
	var wg sync.WaitGroup
	ready := make(chan struct{}, n)
	for i := range procs {
		p := &proc{cmd: start(dbURL)}
		procs[i] = p
		pr, pw := io.Pipe()
		p.cmd.Stdout, p.cmd.Stderr = pw, pw
		if err := p.cmd.Start(); err != nil {
			b.Fatal(err)
		}
		wg.Add(2)
		go func() {
			defer wg.Done()
			p.err = p.cmd.Wait()
			p.exitAt = time.Now()
			pw.Close()
		}()
		go func() {
			defer wg.Done()
			sc := bufio.NewScanner(pr)
			said := false
			for sc.Scan() {
				p.out.WriteString(sc.Text() + "\n")
				if !said && strings.Contains(sc.Text(), readyLine) {
					said = true
					ready <- struct{}{}
				}
			}
			_, _ = io.Copy(io.Discard, pr)
		}()
	}
	defer func() {
		for _, p := range procs {
			if p.exitAt.IsZero() && p.cmd.Process != nil {
				_ = p.cmd.Process.Kill()
			}
		}
		wg.Wait()
	}()
	deadline := time.After(3 * time.Minute)
	for range n {
		select {
		case <-ready:
		case <-deadline:
			b.Fatal("processes not listening after 3 minutes")
		}
	}
	time.Sleep(time.Second) // let the start-up queries end
	if err := d.finish(); err != nil {
		b.Fatal(err)
	}
	wg.Wait()
	commitTS := slowLaneCommitTime(b, ctx, cc)
	var lat []float64
	for _, p := range procs {
		if p.err != nil {
			b.Fatalf("a process failed: %v\n%s", p.err, p.out.String())
		}
		lat = append(lat, ms(p.exitAt.Sub(commitTS)))
	}
	return lat
}

// buildLanes builds the lanes command (without -race) into a temporary directory.
func buildLanes(b *testing.B) string {
	path := filepath.Join(b.TempDir(), "lanes")
	out, err := exec.Command("go", "build", "-o", path, "github.com/multilanes/lanes").CombinedOutput()
	if err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	return path
}

// bareListener is the bare listener process (LANES_BENCH_BARE_LISTENER): connect, LISTEN, say
// "listening", wait for the slow lane's done payload, exit 0.
func bareListener(dbURL string) int {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if _, err := conn.Exec(ctx, "listen "+migrator.DefaultChannel); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("listening")
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if strings.Contains(n.Payload, `"state":"done"`) {
			return 0
		}
	}
}
