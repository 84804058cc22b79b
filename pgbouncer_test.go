package main

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
)

// pgbouncerBinary returns Debian's pgbouncer, or skips the test when it is missing (a failure
// when LANES_TEST_REQUIRE_DB=1: .ci/run installs it).
func pgbouncerBinary(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"pgbouncer", "/usr/sbin/pgbouncer"} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	if os.Getenv("LANES_TEST_REQUIRE_DB") == "1" {
		t.Fatal("pgbouncer is not installed (apt-get install pgbouncer); LANES_TEST_REQUIRE_DB=1 forbids skipping")
	}
	t.Skip("pgbouncer is not installed (apt-get install pgbouncer)")
	return ""
}

// pgbouncerPorts hands out the ports the PgBouncer tests listen on (pgbouncer cannot listen on
// port 0 and say which port it got): 6432-6439, each checked free first.
var pgbouncerPorts struct {
	mu   sync.Mutex
	next int
}

func pgbouncerAddr(t *testing.T) string {
	t.Helper()
	pgbouncerPorts.mu.Lock()
	defer pgbouncerPorts.mu.Unlock()
	for range 8 {
		port := 6432 + pgbouncerPorts.next%8
		pgbouncerPorts.next++
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if ln, err := net.Listen("tcp", addr); err == nil {
			ln.Close()
			return addr
		}
	}
	t.Fatal("no free port in 6432-6439 for pgbouncer")
	return ""
}

// startPgBouncer starts a PgBouncer in front of the server of dbURL, with Debian's default
// settings apart from the database line, the listen address, trust authentication and
// pool_mode (session or transaction), and returns dbURL rewritten to go through it. It is
// stopped at the end of the test; its log is printed if the test failed.
func startPgBouncer(t *testing.T, dbURL, poolMode string) string {
	t.Helper()
	bin := pgbouncerBinary(t)
	cfg, err := pgconn.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil { // pgbouncer drops root for the postgres user
		t.Fatal(err)
	}
	addr := pgbouncerAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	host := cfg.Host
	if strings.HasPrefix(host, "/") {
		host = strings.TrimSuffix(host, "/")
	}
	ini := fmt.Sprintf(`[databases]
* = host=%s port=%d

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %s
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = %s
`, host, cfg.Port, port, filepath.Join(dir, "userlist.txt"), poolMode)
	for name, content := range map[string]string{
		"pgbouncer.ini": ini,
		"userlist.txt":  fmt.Sprintf("%q \"\"\n", cfg.User),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{filepath.Join(dir, "pgbouncer.ini")}
	if os.Geteuid() == 0 { // pgbouncer refuses to run as root
		u := "postgres"
		if _, err := user.Lookup(u); err != nil {
			t.Fatalf("running as root and there is no postgres user for pgbouncer: %v", err)
		}
		args = append([]string{"-u", u}, args...)
	}
	log := &logbuf.Buffer{}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("pgbouncer (%s mode) log:\n%s", poolMode, log.String())
		}
	})
	testkit.Eventually(t, "pgbouncer listens on "+addr, 10*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	u := url.URL{Scheme: "postgres", User: url.User(cfg.User), Host: addr, Path: "/" + cfg.Database, RawQuery: "sslmode=disable"}
	return u.String()
}

// viaPgBouncer returns a function that starts a PgBouncer in poolMode in front of a database.
func viaPgBouncer(poolMode string) func(t *testing.T, dbURL string) string {
	return func(t *testing.T, dbURL string) string { return startPgBouncer(t, dbURL, poolMode) }
}

// TestPgBouncerSessionModeTakeoverAfterSigkill runs the SIGKILL takeover through Debian's
// PgBouncer in session mode with its default settings: the replicas connect (no startup
// parameter it refuses), apply every migration exactly once, and the dead-client check, set by
// a statement after connecting since PgBouncer refuses it as a startup parameter, frees the
// killed applier's lock within about a second (without it: when the killed statement ends).
func TestPgBouncerSessionModeTakeoverAfterSigkill(t *testing.T) {
	t.Parallel()
	takeoverAfterSigkill(t, viaPgBouncer("session"))
}

// TestPgBouncerTransactionModeIsRefused: through PgBouncer in transaction mode a session
// advisory lock lands on a server connection that other clients then use, so the lane lock
// would serialize nothing (two replicas ran one migration at once). migrate, serve and force
// detect the shared server session and refuse, naming the pooler mode, before touching
// anything; status, which only reads, still works.
func TestPgBouncerTransactionModeIsRefused(t *testing.T) {
	t.Parallel()
	serverSlots.reserve(t, 2)
	dbURL := pgtest.NewDB(t)
	poolURL := startPgBouncer(t, dbURL, "transaction")
	dir := testkit.WriteTree(t, map[string]string{
		"fast/001_a.sql": "create table a (i int);",
		"slow/001_b.sql": "insert into a values (1);",
	})
	env := []string{"DATABASE_URL=" + poolURL, "LANES_MIGRATIONS=" + dir}
	for _, args := range [][]string{{"migrate"}, {"force", "--lane", "fast", "--version", "1"}, {"serve", "--addr", "127.0.0.1:0"}} {
		res := runLanes(t, env, args...)
		if res.code != 1 || !strings.Contains(res.stderr, "transaction or statement mode") || !strings.Contains(res.stderr, "pool_mode = session") {
			t.Errorf("lanes %s through a transaction pooler: %v", args[0], res)
		}
	}
	conn := pgtest.Connect(t, dbURL)
	if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_tables where schemaname = 'public'"); n != 0 {
		t.Errorf("%d tables created through the transaction pooler", n)
	}
	// Through a session-mode pooler on the same server, migrate works.
	sessionURL := startPgBouncer(t, dbURL, "session")
	if res := runLanes(t, []string{"DATABASE_URL=" + sessionURL, "LANES_MIGRATIONS=" + dir}, "migrate"); res.code != 0 {
		t.Fatalf("migrate through a session pooler: %v", res)
	}
	if res := runLanes(t, env, "status"); res.code != 0 || !strings.Contains(res.stdout, "done") {
		t.Errorf("status through the transaction pooler: %v", res)
	}
}
