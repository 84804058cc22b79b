package main

// End-to-end tests: real `lanes serve` processes, several replicas sharing one database.
//
// The database comes from pgtest: TEST_DATABASE_URL, else a PostgreSQL container started with
// testcontainers-go (image LANES_TEST_PG_IMAGE, default the official postgres image), else a
// throwaway cluster. CI runs this file twice: once against the local server and once with
// LANES_TEST_BACKEND=container, so the testcontainers path is proven too.

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/pgtest"
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

// migrationsDir writes a fast lane and a slow lane whose one migration takes slowSeconds.
func migrationsDir(t *testing.T, slowSeconds float64) string {
	dir := t.TempDir()
	files := map[string]string{
		"fast/001_create_example.sql":   "create table example (id int primary key, name text not null);",
		"fast/002_populate_example.sql": "insert into example select g, 'seed-' || g from generate_series(1, 10) g;",
		"slow/001_load_example.sql":     fmt.Sprintf("select pg_sleep(%g);\ninsert into example select g, 'loaded-' || g from generate_series(11, 1000) g;", slowSeconds),
		"slow/002_index_example.sql":    "---- tern: disable-tx ----\ndrop index concurrently if exists example_name_idx;\ncreate index concurrently example_name_idx on example (name);",
	}
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// replica is one `lanes serve` process.
type replica struct {
	name string
	cmd  *exec.Cmd
	addr string
	log  *lockedBuffer
	done chan error
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func startReplica(t *testing.T, name, dbURL, migrations string) *replica {
	t.Helper()
	r := &replica{name: name, addr: freeAddr(t), log: &lockedBuffer{}, done: make(chan error, 1)}
	r.cmd = exec.Command(lanesBinary(t), "serve", "--addr", r.addr)
	r.cmd.Env = append(os.Environ(), "DATABASE_URL="+dbURL, "LANES_MIGRATIONS="+migrations, "LANES_LOG_FORMAT=json",
		"PGAPPNAME=lanes-"+name)
	r.cmd.Stdout, r.cmd.Stderr = r.log, r.log
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.done <- r.cmd.Wait() }()
	t.Cleanup(func() {
		r.cmd.Process.Kill()
		<-r.done
		if t.Failed() {
			t.Logf("replica %s log:\n%s", r.name, r.log.String())
		}
	})
	return r
}

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

func eventually(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func queryInt(t *testing.T, dbURL, sql string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, sql).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// TestReplicasShareTheLanes starts three replicas at once on an empty database, then a fourth
// while the slow lane runs, and checks: all become ready before the slow lane ends, every
// migration is applied exactly once, every replica learns of the slow lane's completion, the
// ones that did not apply it through LISTEN/NOTIFY, and all stop cleanly on SIGTERM.
func TestReplicasShareTheLanes(t *testing.T) {
	dbURL := pgtest.NewDB(t)
	dir := migrationsDir(t, 4)
	var rs []*replica
	for i := range 3 {
		rs = append(rs, startReplica(t, fmt.Sprintf("r%d", i+1), dbURL, dir))
	}
	for _, r := range rs {
		eventually(t, "replica "+r.name+" ready", 30*time.Second, r.ready)
	}
	for _, r := range rs {
		if k := r.known(t, "slow"); k.Done {
			t.Fatalf("replica %s: slow lane done already; the test needs it running", r.name)
		}
	}
	// A replica started while the slow lane runs becomes ready while it still runs.
	late := startReplica(t, "late", dbURL, dir)
	eventually(t, "late replica ready", 30*time.Second, late.ready)
	st := late.status(t)
	if st.Lanes[1].Name != "slow" || st.Lanes[1].Done() {
		t.Fatalf("late replica became ready only after the slow lane: %+v", st.Lanes)
	}
	rs = append(rs, late)

	for _, r := range rs {
		eventually(t, "replica "+r.name+" learns the slow lane is done", 60*time.Second, func() bool { return r.known(t, "slow").Done })
	}
	via := map[string]int{}
	for _, r := range rs {
		k := r.known(t, "slow")
		via[k.Via]++
		if v := r.status(t).Replica; v.Listener != "listening" {
			t.Fatalf("replica %s listener is %s", r.name, v.Listener)
		}
	}
	if via["notification"] < len(rs)-1 || via["notification"]+via["applied"] != len(rs) {
		t.Fatalf("how the replicas learned the slow lane was done: %v; want all but the applier by notification", via)
	}
	if n := queryInt(t, dbURL, "select count(*) from lanes_history where error is null"); n != 4 {
		t.Fatalf("history has %d successful migrations, want 4 (each applied exactly once)", n)
	}
	if n := queryInt(t, dbURL, "select count(*) from example"); n != 1000 {
		t.Fatalf("example has %d rows, want 1000", n)
	}
	for _, r := range rs {
		r.stop(t)
	}
}

// TestStatusAndWaitAgainstLiveReplicas checks the CLI's status and wait against the database
// the replicas share: wait returns once the slow lane is done, without applying anything.
func TestStatusAndWaitAgainstLiveReplicas(t *testing.T) {
	dbURL := pgtest.NewDB(t)
	dir := migrationsDir(t, 2)
	r := startReplica(t, "w1", dbURL, dir)
	eventually(t, "replica ready", 30*time.Second, r.ready)
	wait := exec.Command(lanesBinary(t), "wait", "--lane", "slow", "--timeout", "60s")
	wait.Env = append(os.Environ(), "DATABASE_URL="+dbURL, "LANES_MIGRATIONS="+dir, "LANES_LOG_FORMAT=json")
	out, err := wait.CombinedOutput()
	if err != nil {
		t.Fatalf("lanes wait: %v\n%s", err, out)
	}
	status := exec.Command(lanesBinary(t), "status", "--json")
	status.Env = wait.Env
	out, err = status.Output()
	if err != nil {
		t.Fatalf("lanes status: %v", err)
	}
	var st struct {
		Lanes []migrator.LaneStatus `json:"lanes"`
	}
	if err := json.Unmarshal(out, &st); err != nil || len(st.Lanes) != 2 || st.Lanes[1].State != migrator.StateDone || st.Lanes[1].Version != 2 {
		t.Fatalf("status --json = %s (%v)", out, err)
	}
	r.stop(t)
}
