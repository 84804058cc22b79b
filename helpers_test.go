package main

// Helpers shared by the end-to-end tests (testcontainers_test.go) and the fault-injection tests
// (faults_test.go): the lanes binary, `lanes serve` replicas, one-shot and background CLI runs,
// migration folders, throwaway clusters and a few queries.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/session"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

var binary struct {
	once sync.Once
	dir  string
	path string
	err  error
}

func TestMain(m *testing.M) {
	pgtest.RunMain(m, func() {
		if binary.dir != "" {
			os.RemoveAll(binary.dir)
		}
	})
}

// lanesBinary builds the lanes command once per test process.
func lanesBinary(t *testing.T) string {
	t.Helper()
	binary.once.Do(func() {
		binary.dir, binary.err = os.MkdirTemp("", "lanes-e2e-")
		if binary.err != nil {
			return
		}
		binary.path = filepath.Join(binary.dir, "lanes")
		out, err := exec.Command("go", "build", "-race", "-o", binary.path, ".").CombinedOutput()
		if err != nil {
			binary.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binary.err != nil {
		t.Fatal(binary.err)
	}
	return binary.path
}

// childEnv returns the environment of a lanes process: this one's, LANES_LOG_FORMAT=json, then
// extra (NAME=value, later entries win). The binary is built with -race, whose runtime sleeps a
// second at exit while goroutines remain (GORACE atexit_sleep_ms): that sleep is turned off so
// that exit times measure lanes, not the race detector.
func childEnv(extra ...string) []string {
	env := append(os.Environ(), "LANES_LOG_FORMAT=json", "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	return append(env, extra...)
}

// raced reports whether a lanes process's output holds a data race report.
func raced(output string) bool { return strings.Contains(output, "WARNING: DATA RACE") }

// serverSlots bounds the lanes processes that the parallel tests run against the shared test
// server at once. Each uses up to four connections (LISTEN, a lane, two for /lanes), and the
// local server's max_connections (100) is shared with the test packages that go test runs at
// the same time.
var serverSlots = newSemaphore(12)

// semaphore is a counting semaphore whose slots are taken all at once.
type semaphore struct {
	mu   sync.Mutex
	cond *sync.Cond
	size int
	free int
}

func newSemaphore(n int) *semaphore {
	s := &semaphore{size: n, free: n}
	s.cond = sync.NewCond(&s.mu)
	return s
}

// reserve waits until n slots are free and takes them for the rest of the test.
func (s *semaphore) reserve(t *testing.T, n int) {
	t.Helper()
	if n > s.size {
		t.Fatalf("reserve %d slots of %d", n, s.size)
	}
	s.mu.Lock()
	for s.free < n {
		s.cond.Wait()
	}
	s.free -= n
	s.mu.Unlock()
	t.Cleanup(func() {
		s.mu.Lock()
		s.free += n
		s.mu.Unlock()
		s.cond.Broadcast()
	})
}

// replica is one `lanes serve` process.
type replica struct {
	name string
	cmd  *exec.Cmd
	addr string
	log  *logbuf.Buffer
	done chan error
}

// startReplica starts `lanes serve` on a free port against dbURL and the migrations folder, with
// application_name lanes-<name> on every connection (PGAPPNAME) and extraEnv (NAME=value) added
// to the environment. It is killed at the end of the test; its log is printed if the test failed.
func startReplica(t *testing.T, name, dbURL, migrations string, extraEnv ...string) *replica {
	t.Helper()
	r := &replica{name: name, log: &logbuf.Buffer{}, done: make(chan error, 1)}
	// Port 0: the replica binds a free port itself and logs it (a port picked here and closed
	// could be taken by another process before the replica binds it).
	r.cmd = exec.Command(lanesBinary(t), "serve", "--addr", "127.0.0.1:0")
	r.cmd.Env = childEnv(append([]string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + migrations, "PGAPPNAME=lanes-" + name}, extraEnv...)...)
	r.cmd.Stdout, r.cmd.Stderr = r.log, r.log
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.done <- r.cmd.Wait() }()
	t.Cleanup(func() {
		r.cmd.Process.Kill()
		<-r.done
		if raced(r.log.String()) {
			t.Errorf("replica %s reported a data race", r.name)
		}
		if t.Failed() {
			t.Logf("replica %s log:\n%s", r.name, r.log.String())
		}
	})
	testkit.Eventually(t, "replica "+name+" logs its address", 60*time.Second, func() bool {
		if m := servingAddr.FindStringSubmatch(r.log.String()); m != nil {
			r.addr = m[1]
			return true
		}
		select {
		case err := <-r.done:
			r.done <- err // for the cleanup
			t.Fatalf("replica %s exited (%v) before it listened:\n%s", name, err, r.log.String())
		default:
		}
		return false
	})
	return r
}

// servingAddr finds the address `lanes serve` logs when it listens.
var servingAddr = regexp.MustCompile(`"addr":"(127\.0\.0\.1:[0-9]+)"`)

// appName returns the application_name of the replica's sessions.
func (r *replica) appName() string { return "lanes-" + r.name }

func (r *replica) get(path string) (int, []byte) {
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + r.addr + path)
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return resp.StatusCode, []byte(b.String())
}

func (r *replica) ready() bool {
	code, _ := r.get("/readyz")
	return code == http.StatusOK
}

func (r *replica) status(t *testing.T) app.Status {
	t.Helper()
	code, body := r.get("/lanes")
	var st app.Status
	if code != http.StatusOK || json.Unmarshal(body, &st) != nil {
		t.Fatalf("replica %s: GET /lanes = %d %s", r.name, code, body)
	}
	return st
}

func (r *replica) known(t *testing.T, lane string) app.KnownLane {
	for _, k := range r.status(t).Replica.Lanes {
		if k.Name == lane {
			return k
		}
	}
	t.Fatalf("replica %s does not know lane %s", r.name, lane)
	return app.KnownLane{}
}

// view returns what the replica knows (its /lanes "replica" part), whether or not it could read
// the database for the rest of the answer: /lanes answers 503 with the view when it cannot.
// ok is false when the replica did not answer.
func (r *replica) view() (app.ReplicaView, bool) {
	code, body := r.get("/lanes")
	var st app.Status
	if code == 0 || json.Unmarshal(body, &st) != nil {
		return app.ReplicaView{}, false
	}
	return st.Replica, true
}

// knows returns the replica's view of a lane; ok is false when the replica did not answer.
func (r *replica) knows(lane string) (app.KnownLane, bool) {
	v, ok := r.view()
	if !ok {
		return app.KnownLane{}, false
	}
	for _, k := range v.Lanes {
		if k.Name == lane {
			return k, true
		}
	}
	return app.KnownLane{}, false
}

// stop sends SIGTERM and waits for a clean exit.
func (r *replica) stop(t *testing.T) {
	t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		if err != nil {
			t.Fatalf("replica %s exited with %v after SIGTERM:\n%s", r.name, err, r.log.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("replica %s did not stop within 20 s of SIGTERM", r.name)
	}
}

// kill sends SIGKILL and waits until the process is gone.
func (r *replica) kill(t *testing.T) {
	t.Helper()
	if err := r.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
	case <-time.After(20 * time.Second):
		t.Fatalf("replica %s still runs 20 s after SIGKILL", r.name)
	}
}

// cliRun is the outcome of one lanes command run to completion.
type cliRun struct {
	code           int
	stdout, stderr string
	took           time.Duration
}

func (r cliRun) String() string {
	return fmt.Sprintf("exit %d after %s\nstdout:\n%s\nstderr:\n%s", r.code, r.took.Round(time.Millisecond), r.stdout, r.stderr)
}

// runLanes runs the lanes binary with args and extraEnv (NAME=value) added to the environment,
// bounded by two minutes, and returns its exit code and output.
func runLanes(t *testing.T, extraEnv []string, args ...string) cliRun {
	t.Helper()
	res, err := execLanes(t.Context(), lanesBinary(t), extraEnv, args...)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// execLanes is runLanes for any goroutine: it returns an error instead of failing the test.
func execLanes(ctx context.Context, bin string, extraEnv []string, args ...string) (cliRun, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = childEnv(extraEnv...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	res := cliRun{code: cmd.ProcessState.ExitCode(), stdout: stdout.String(), stderr: stderr.String(), took: time.Since(start)}
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		return res, fmt.Errorf("lanes %q: %w", args, err)
	}
	if raced(res.stderr) {
		return res, fmt.Errorf("lanes %q reported a data race:\n%s", args, res.stderr)
	}
	return res, nil
}

// process is a lanes command running in the background, such as `lanes wait`.
type process struct {
	cmd    *exec.Cmd
	stdout *logbuf.Buffer
	stderr *logbuf.Buffer
	done   chan struct{} // closed once the process has exited
	at     time.Time     // when it exited; valid once done is closed
}

// startLanes starts the lanes binary with args and extraEnv in the background. It is killed at
// the end of the test; its output is printed if the test failed.
func startLanes(t *testing.T, extraEnv []string, args ...string) *process {
	t.Helper()
	p := &process{stdout: &logbuf.Buffer{}, stderr: &logbuf.Buffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(lanesBinary(t), args...)
	p.cmd.Env = childEnv(extraEnv...)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = p.cmd.Wait() // the exit code is read from ProcessState
		p.at = time.Now()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		if raced(p.stderr.String()) {
			t.Errorf("lanes %q reported a data race", args)
		}
		if t.Failed() {
			t.Logf("lanes %q output:\nstdout:\n%s\nstderr:\n%s", args, p.stdout.String(), p.stderr.String())
		}
	})
	return p
}

// exited reports whether the process has exited.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// wait waits for the process to exit and returns its exit code and when it exited.
func (p *process) wait(t *testing.T, within time.Duration) (int, time.Time) {
	t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode(), p.at
	case <-time.After(within):
		t.Fatalf("lanes %q still runs after %s:\nstderr:\n%s", p.cmd.Args[1:], within, p.stderr.String())
		return 0, time.Time{}
	}
}

// startCluster starts a throwaway PostgreSQL cluster, stopped at the end of the test. Without
// server binaries the test skips, or fails when LANES_TEST_REQUIRE_DB=1.
func startCluster(t *testing.T, opts pgcluster.Options) *pgcluster.Cluster {
	t.Helper()
	if _, err := pgcluster.FindBinaries(); err != nil {
		if os.Getenv("LANES_TEST_REQUIRE_DB") == "1" {
			t.Fatalf("this test needs a throwaway cluster: %v", err)
		}
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	c, err := pgcluster.Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Error(err)
		}
	})
	return c
}

// lockKey returns the advisory lock key of a lane of the migrations folder in the database at
// dbURL, as (*migrator.Migrator).LockKey computes it.
func lockKey(t *testing.T, dbURL, dir, lane string) int64 {
	t.Helper()
	lanes, err := migrator.LanesFromFS(os.DirFS(dir), nil)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := pgx.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	m, err := migrator.New(cc, lanes, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	key, err := m.LockKey(t.Context(), pgtest.Connect(t, dbURL), lane)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// holder is the session holding a lane's lock.
type holder struct {
	app   string // its application_name: lanes-<replica name>
	pid   int    // its backend pid
	query string // the statement it runs, or ran last
	state string // pg_stat_activity.state
}

// lockHolder returns the session holding the advisory lock key in conn's database; ok is false
// when no session holds it.
func lockHolder(t *testing.T, conn *pgx.Conn, key int64) (h holder, ok bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	err := conn.QueryRow(ctx, `select coalesce(a.application_name, ''), l.pid, coalesce(a.query, ''), coalesce(a.state, '')
from pg_locks l left join pg_stat_activity a on a.pid = l.pid
where l.locktype = 'advisory' and l.granted and l.objsubid = 1
  and l.database = (select oid from pg_database where datname = current_database())
  and l.classid = $1::int8::oid and l.objid = $2::int8::oid`,
		int64(uint64(key)>>32), int64(uint64(key)&0xffffffff)).Scan(&h.app, &h.pid, &h.query, &h.state)
	if errors.Is(err, pgx.ErrNoRows) {
		return holder{}, false
	}
	if err != nil {
		t.Fatalf("read the holder of lock %d: %v", key, err)
	}
	return h, true
}

// takenOver reports whether a session other than old took the lane of key over: it holds the
// lock now, or it already applied the long migration (version 2 of runsLanes-like folders)
// and released the lane, between two polls (a taker finishing the rest in about a second does
// that under load). took is the time from since to the taker seen holding the lock, or to
// its history row's start of that migration.
func takenOver(t *testing.T, conn *pgx.Conn, key int64, old holder, since time.Time) (taker holder, took time.Duration, ok bool) {
	t.Helper()
	if cur, held := lockHolder(t, conn, key); held && cur.pid != old.pid {
		return cur, time.Since(since), true
	}
	var began time.Time
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	err := conn.QueryRow(ctx, `select application_name, started_at from lanes_history
where lane = 'slow' and version = 2 and error is null and application_name <> $1 order by id limit 1`, old.app).Scan(&taker.app, &began)
	if errors.Is(err, pgx.ErrNoRows) {
		return holder{}, 0, false
	}
	if err != nil {
		t.Fatalf("read the history: %v", err)
	}
	return taker, began.Sub(since), true
}

// hasDeadClientCheck reports whether conn's server has client_connection_check_interval
// (PostgreSQL 14 and later), which the lanes processes then set.
func hasDeadClientCheck(t *testing.T, conn *pgx.Conn) bool {
	t.Helper()
	return pgtest.Scalar[int](t, conn, "select current_setting('server_version_num')::int") >= session.DeadClientCheckVersion
}

// figure logs a measured figure in the greppable form the README's reliability section quotes:
//
//	FIGURE name=1.23s (bound ...)
//
// A zero bound logs the figure without one.
func figure(t *testing.T, name string, d, bound time.Duration) {
	t.Helper()
	if bound == 0 {
		t.Logf("FIGURE %s=%.2fs", name, d.Seconds())
		return
	}
	t.Logf("FIGURE %s=%.2fs (bound %s)", name, d.Seconds(), bound)
}
