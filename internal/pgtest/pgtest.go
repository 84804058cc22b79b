// Package pgtest is the one helper every test uses to get a real PostgreSQL database.
//
// Each package that uses it calls [RunMain] from its TestMain:
//
//	func TestMain(m *testing.M) { pgtest.RunMain(m) }
//
// and each test asks for its own fresh database with [NewDB]. The server is chosen once per test
// process, on first use, in this order:
//
//  1. LANES_TEST_BACKEND forces a backend: "url", "container" or "cluster". A forced backend
//     that cannot be had fails the tests instead of skipping them.
//  2. TEST_DATABASE_URL, an admin URL on which CREATE DATABASE works ("url").
//  3. A PostgreSQL container started with testcontainers-go when a Docker engine answers within
//     a few seconds ("container"). The image is LANES_TEST_PG_IMAGE, default "postgres:15".
//     Docker is found from DOCKER_HOST, else the default socket.
//  4. A throwaway cluster from the server binaries on the machine, see package pgcluster
//     ("cluster").
//  5. None: tests calling [NewDB] skip, or fail when LANES_TEST_REQUIRE_DB=1.
//
// A container or cluster is started once per test process and stopped by [RunMain].
//
// The functions are safe for concurrent use by parallel tests.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
	tcpostgres "github.com/testcontainers/testcontainers-go/modules/postgres"
	"go.uber.org/goleak"

	"github.com/multilanes/lanes/internal/pgcluster"
)

// Backend names reported by [Backend].
const (
	backendURL       = "url"
	backendContainer = "container"
	backendCluster   = "cluster"
)

// server is the per-process choice of server. A test helper needs this one piece of process
// state: every test of the process shares the server, and RunMain must stop it.
var server struct {
	once    sync.Once
	backend string
	url     string       // admin URL
	err     error        // why there is no server
	skip    bool         // err means "skip", not "fail"
	stop    func() error // stops a container or cluster; nil for a URL
	stopped bool         // stop has run; guarded by mu
	mu      sync.Mutex
}

// inMain reports that RunMain is running the tests.
var inMain atomic.Bool

// RunMain runs the tests of m, then stops any container or cluster the tests started, then
// checks for leaked goroutines when the tests passed, and exits the process with a non-zero code
// if the tests failed, the server did not stop cleanly or goroutines leaked. Call it from
// TestMain; nothing after it runs.
//
// Each cleanup runs after the tests, before the server stops.
func RunMain(m *testing.M, cleanups ...func()) {
	inMain.Store(true)
	code := m.Run()
	for _, c := range cleanups {
		c()
	}
	if err := dropExampleDBs(); err != nil {
		fmt.Fprintf(os.Stderr, "pgtest: %v\n", err)
		code = max(code, 1)
	}
	if err := shutdown(); err != nil {
		fmt.Fprintf(os.Stderr, "pgtest: stop %s: %v\n", server.backend, err)
		code = max(code, 1)
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "pgtest: goroutines leaked by the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// shutdown stops the server if this process started one. It is idempotent.
func shutdown() error {
	server.mu.Lock()
	defer server.mu.Unlock()
	if server.stop == nil || server.stopped {
		return nil
	}
	server.stopped = true
	return server.stop()
}

// Backend chooses the server if not done yet (which may start a container or cluster, so call
// it only under [RunMain]) and returns its backend: "url", "container" or "cluster", or "" when
// there is none.
func Backend() string {
	server.once.Do(choose)
	return server.backend
}

// AdminURL returns the admin URL of the chosen server, on which the test may create databases
// and roles. It skips the test when no server is available, or fails it when a backend was
// forced or LANES_TEST_REQUIRE_DB=1. Prefer [NewDB] for anything that does not need the admin
// database.
func AdminURL(t testing.TB) string {
	t.Helper()
	if !inMain.Load() {
		t.Fatal("pgtest: the package's TestMain must call pgtest.RunMain(m)")
	}
	server.once.Do(choose)
	switch {
	case server.err == nil:
		return server.url
	case server.skip && os.Getenv("LANES_TEST_REQUIRE_DB") != "1":
		t.Skipf("pgtest: %v", server.err)
	default:
		t.Fatalf("pgtest: %v", server.err)
	}
	return ""
}

// NewDB creates a fresh, empty database (named lanes_t_<random hex>, copied from template0) for
// the test, returns its connection URL and drops it when the test and its subtests end, closing
// any connection still open to it. It skips or fails like [AdminURL] when there is no server.
func NewDB(t testing.TB) string {
	t.Helper()
	admin := AdminURL(t)
	var b [8]byte
	_, _ = rand.Read(b[:])
	name := "lanes_t_" + hex.EncodeToString(b[:])
	dbURL, err := withDatabase(admin, name)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if err := adminExec(ctx, admin, "create database "+pgx.Identifier{name}.Sanitize()+" template template0"); err != nil {
		t.Fatalf("pgtest: create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := adminExec(ctx, admin, "drop database if exists "+pgx.Identifier{name}.Sanitize()+" with (force)"); err != nil {
			t.Errorf("pgtest: drop database %s: %v", name, err)
		}
	})
	return dbURL
}

// exampleDBs are the databases made by ExampleDB, dropped by RunMain.
var exampleDBs struct {
	mu    sync.Mutex
	names []string
}

// ExampleDB returns the URL of a fresh database for a runnable Example function, which has no
// testing.T: it is dropped by RunMain after every test and example has run. Without a server it
// prints why to stderr and returns "", so the example fails (examples cannot skip).
func ExampleDB() string {
	server.once.Do(choose)
	if server.err != nil {
		fmt.Fprintf(os.Stderr, "pgtest: example without a database: %v\n", server.err)
		return ""
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	name := "lanes_x_" + hex.EncodeToString(b[:])
	dbURL, err := withDatabase(server.url, name)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		err = adminExec(ctx, server.url, "create database "+pgx.Identifier{name}.Sanitize()+" template template0")
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "pgtest: example database: %v\n", err)
		return ""
	}
	exampleDBs.mu.Lock()
	exampleDBs.names = append(exampleDBs.names, name)
	exampleDBs.mu.Unlock()
	return dbURL
}

// dropExampleDBs drops the databases made by ExampleDB.
func dropExampleDBs() error {
	exampleDBs.mu.Lock()
	defer exampleDBs.mu.Unlock()
	var errs []error
	for _, name := range exampleDBs.names {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		errs = append(errs, adminExec(ctx, server.url, "drop database if exists "+pgx.Identifier{name}.Sanitize()+" with (force)"))
		cancel()
	}
	exampleDBs.names = nil
	return errors.Join(errs...)
}

// adminExec runs one statement on a new connection to the admin URL.
func adminExec(ctx context.Context, admin, sql string) error {
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = conn.Exec(ctx, sql)
	return err
}

// withDatabase returns the connection string u pointing at database db: a postgres:// URL, or
// a keyword/value string ("host=/var/run/postgresql user=postgres"), to which a later dbname
// setting is added (the last one wins).
func withDatabase(u, db string) (string, error) {
	if !strings.HasPrefix(u, "postgres://") && !strings.HasPrefix(u, "postgresql://") {
		if _, err := pgx.ParseConfig(u); err != nil {
			return "", fmt.Errorf("admin connection string %q: %w", redact(u), err)
		}
		return u + " dbname=" + db, nil // db is lanes_[tx]_<hex>: no quoting needed
	}
	parsed, err := url.Parse(u)
	if err != nil {
		return "", fmt.Errorf("admin URL %q is not a postgres:// URL", redact(u))
	}
	parsed.Path, parsed.RawPath = "/"+db, ""
	q := parsed.Query()
	if q.Has("dbname") {
		q.Del("dbname")
		parsed.RawQuery = q.Encode()
	}
	return parsed.String(), nil
}

// ProxyTarget returns what a TCP proxy in front of the server of connString dials: "host:port",
// or the path of the server's Unix socket when connString names a socket directory.
func ProxyTarget(t testing.TB, connString string) string {
	t.Helper()
	cc, err := pgx.ParseConfig(connString)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	if strings.HasPrefix(cc.Host, "/") {
		return fmt.Sprintf("%s/.s.PGSQL.%d", cc.Host, cc.Port)
	}
	return net.JoinHostPort(cc.Host, strconv.Itoa(int(cc.Port)))
}

// ThroughProxy returns a postgres:// URL for the same database, user and password as
// connString, reaching the server through a TCP proxy listening on addr (with sslmode=disable,
// so the proxy can read the protocol).
func ThroughProxy(t testing.TB, connString string, addr net.Addr) string {
	t.Helper()
	cc, err := pgx.ParseConfig(connString)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	u := url.URL{Scheme: "postgres", Host: addr.String(), Path: "/" + cc.Database, RawQuery: "sslmode=disable"}
	if cc.Password != "" {
		u.User = url.UserPassword(cc.User, cc.Password)
	} else {
		u.User = url.User(cc.User)
	}
	return u.String()
}

// redact hides the password in a connection string for logging.
func redact(u string) string {
	if !strings.HasPrefix(u, "postgres://") && !strings.HasPrefix(u, "postgresql://") {
		return passwordSetting.ReplaceAllString(u, "password=xxxxx")
	}
	if parsed, err := url.Parse(u); err == nil {
		return parsed.Redacted()
	}
	return "(unparsable URL)"
}

// passwordSetting matches the password of a keyword/value connection string.
var passwordSetting = regexp.MustCompile(`password\s*=\s*('(\\.|[^'])*'|\S+)`)

// choose picks the server once per process; see the package documentation for the order.
func choose() {
	forced := os.Getenv("LANES_TEST_BACKEND")
	dbURL := os.Getenv("TEST_DATABASE_URL")
	var err error
	switch {
	case forced == backendURL || (forced == "" && dbURL != ""):
		if dbURL == "" {
			err = errors.New("backend url forced by LANES_TEST_BACKEND, but TEST_DATABASE_URL is empty")
		}
		server.backend, server.url = backendURL, dbURL
	case forced == backendContainer:
		err = startContainer()
	case forced == backendCluster:
		err = startCluster()
	case forced != "":
		err = fmt.Errorf("unknown LANES_TEST_BACKEND=%q: want url, container or cluster", forced)
	default:
		if dockerErr := pingDocker(); dockerErr == nil {
			if err = startContainer(); err == nil {
				break
			}
			fmt.Fprintf(os.Stderr, "pgtest: %v; trying a throwaway cluster\n", err)
		}
		err = startCluster()
		if errors.Is(err, pgcluster.ErrNoBinaries) {
			err = errors.New("no PostgreSQL for tests: set TEST_DATABASE_URL, start Docker, " +
				"or install the PostgreSQL server package (or set LANES_PG_BINDIR)")
			server.skip = true
		}
	}
	if err != nil {
		server.backend, server.url, server.err = "", "", err
		fmt.Fprintf(os.Stderr, "pgtest: no database server: %v\n", err)
		return
	}
	fmt.Fprintf(os.Stderr, "pgtest: using backend %q at %s\n", server.backend, redact(server.url))
}

// pingDocker reports whether a Docker engine answers at DOCKER_HOST (default: the local
// socket) within a few seconds.
func pingDocker() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	cli, err := client.New(client.FromEnv)
	if err != nil {
		return fmt.Errorf("docker client: %w", err)
	}
	defer cli.Close()
	if _, err := cli.Ping(ctx, client.PingOptions{}); err != nil {
		return fmt.Errorf("docker ping: %w", err)
	}
	return nil
}

// startContainer starts the PostgreSQL container of this process.
func startContainer() error {
	if err := pingDocker(); err != nil {
		return fmt.Errorf("docker engine not usable: %w", err)
	}
	image := os.Getenv("LANES_TEST_PG_IMAGE")
	if image == "" {
		image = "postgres:15"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ctr, err := tcpostgres.Run(ctx, image,
		tcpostgres.BasicWaitStrategies(),
		testcontainers.WithCmdArgs("-c", "max_connections=200"),
	)
	if err != nil {
		if ctr != nil {
			_ = ctr.Terminate(context.WithoutCancel(ctx))
		}
		return fmt.Errorf("start container from image %s: %w", image, err)
	}
	u, err := ctr.ConnectionString(ctx, "sslmode=disable")
	if err != nil {
		_ = ctr.Terminate(context.WithoutCancel(ctx))
		return fmt.Errorf("container connection string: %w", err)
	}
	server.backend, server.url = backendContainer, u
	server.stop = func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		return ctr.Terminate(ctx)
	}
	return nil
}

// startCluster starts the throwaway cluster of this process.
func startCluster() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := pgcluster.Start(ctx, pgcluster.Options{MaxConnections: 200})
	if err != nil {
		return fmt.Errorf("start throwaway cluster: %w", err)
	}
	server.backend, server.url, server.stop = backendCluster, c.ConnString("postgres"), c.Stop
	return nil
}

// StartStandby starts a streaming standby of primary (see pgcluster.Cluster.StartStandby),
// stopped when the test ends, and fails the test when it is not up within timeout.
func StartStandby(t testing.TB, primary *pgcluster.Cluster, timeout time.Duration) *pgcluster.Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	standby, err := primary.StartStandby(ctx)
	if err != nil {
		t.Fatalf("start a standby: %v", err)
	}
	t.Cleanup(func() {
		if err := standby.Stop(); err != nil {
			t.Error(err)
		}
	})
	return standby
}
