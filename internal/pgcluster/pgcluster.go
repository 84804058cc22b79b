// Package pgcluster starts and stops throwaway PostgreSQL clusters from the server binaries
// installed on the machine (initdb, pg_ctl, postgres).
//
// A cluster lives in its own temporary directory, listens on 127.0.0.1 on a free TCP port and on
// a Unix socket in that directory, trusts every local connection and runs with fsync off: it is
// for demos and tests, never for data that matters. The `lanes demo` command uses it when no
// server is reachable, and tests use it when they must restart or stop a server without
// disturbing a shared one. [Cluster.StartStandby] adds a hot standby of a cluster (an online
// copy of its files taken with the low-level backup API, so it needs no pg_basebackup and works
// with the server binaries alone, from PostgreSQL 13 on), for tests of what does not work on a
// standby, such as LISTEN.
//
// When the calling process runs as root, the server runs as the OS user "postgres" (PostgreSQL
// refuses to run as root), and the cluster directory is owned by that user.
package pgcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// ErrNoBinaries is returned (wrapped) by [FindBinaries] and [Start] when no directory holding
// the PostgreSQL server binaries can be found.
var ErrNoBinaries = errors.New("postgresql server binaries (initdb, pg_ctl, postgres) not found: " +
	"install the PostgreSQL server package (e.g. apt-get install postgresql) or set LANES_PG_BINDIR")

var serverBinaries = []string{"initdb", "pg_ctl", "postgres"}

// FindBinaries returns the directory holding initdb, pg_ctl and postgres. It tries, in order:
// the environment variable LANES_PG_BINDIR (which must then hold them), the output of
// `pg_config --bindir`, the directory of pg_ctl on PATH, and the newest
// /usr/lib/postgresql/<version>/bin. The error wraps [ErrNoBinaries] when none fits.
func FindBinaries() (string, error) {
	if dir := os.Getenv("LANES_PG_BINDIR"); dir != "" {
		if missing := missingBinary(dir); missing != "" {
			return "", fmt.Errorf("no %s in LANES_PG_BINDIR=%s: %w", missing, dir, ErrNoBinaries)
		}
		return dir, nil
	}
	var candidates []string
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "pg_config", "--bindir").Output(); err == nil {
		candidates = append(candidates, strings.TrimSpace(string(out)))
	}
	if p, err := exec.LookPath("pg_ctl"); err == nil {
		candidates = append(candidates, filepath.Dir(p))
	}
	versioned, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(versioned, func(i, j int) bool { return pgVersion(versioned[i]) > pgVersion(versioned[j]) })
	candidates = append(candidates, versioned...)
	for _, dir := range candidates {
		if missingBinary(dir) == "" {
			return dir, nil
		}
	}
	return "", ErrNoBinaries
}

// pgVersion extracts the major version from /usr/lib/postgresql/<version>/bin, or 0.
func pgVersion(bindir string) float64 {
	v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(bindir)), 64)
	return v
}

// missingBinary returns the name of the first server binary not found in dir, or "".
func missingBinary(dir string) string {
	for _, name := range serverBinaries {
		if st, err := os.Stat(filepath.Join(dir, name)); err != nil || st.IsDir() {
			return name
		}
	}
	return ""
}

// Options configures [Start]. The zero value is ready to use.
type Options struct {
	// BinDir holds initdb, pg_ctl and postgres. Default: [FindBinaries].
	BinDir string
	// MaxConnections is the server's max_connections. Default 100.
	MaxConnections int
	// Params are extra server settings written to postgresql.conf (name to value, e.g.
	// "client_connection_check_interval": "1000"); values are quoted for you.
	Params map[string]string
	// Logger receives one line when the cluster starts, restarts and stops. Default: no logging.
	Logger zerolog.Logger
}

// Cluster is a running throwaway PostgreSQL server. Its methods are safe for concurrent use.
type Cluster struct {
	bindir  string
	root    string // temporary directory holding data/, sock/ and server.log
	port    int
	cred    *syscall.Credential // non-nil when commands must run as the postgres user
	logger  zerolog.Logger
	mu      sync.Mutex
	running bool
	removed bool
	backups int // backups taken, to name the next one
}

// Start creates a cluster in a new temporary directory (initdb with trust authentication,
// UTF8 encoding and superuser "postgres") and starts it with `pg_ctl -w`, returning once the
// server accepts connections. The caller must call [Cluster.Stop]. On failure nothing is left
// behind, and the error includes the tail of the server log when the server did not start.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	if opts.BinDir == "" {
		dir, err := FindBinaries()
		if err != nil {
			return nil, err
		}
		opts.BinDir = dir
	} else if missing := missingBinary(opts.BinDir); missing != "" {
		return nil, fmt.Errorf("no %s in bin directory %s: %w", missing, opts.BinDir, ErrNoBinaries)
	}
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = 100
	}
	c := &Cluster{bindir: opts.BinDir, logger: opts.Logger}
	if os.Geteuid() == 0 {
		cred, err := postgresCredential()
		if err != nil {
			return nil, err
		}
		c.cred = cred
	}
	root, err := os.MkdirTemp("", "lanes-pg-")
	if err != nil {
		return nil, fmt.Errorf("create cluster directory: %w", err)
	}
	c.root = root
	if err := c.create(ctx, opts); err != nil {
		_ = c.removeDirs()
		return nil, err
	}
	// A free port can be taken by someone else before the server binds it: try a few.
	for attempt := 1; ; attempt++ {
		err = c.startOnFreePort(ctx)
		if err == nil || attempt == 3 || !strings.Contains(err.Error(), "already in use") {
			break
		}
	}
	c.running = true
	if err != nil {
		_ = c.stopLocked("immediate") // in case pg_ctl gave up waiting on a server that started
		_ = c.removeDirs()
		return nil, err
	}
	c.logger.Info().Int("port", c.port).Str("dir", root).Msg("pgcluster: started")
	return c, nil
}

// postgresCredential returns the credential of the OS user postgres, for running as root.
func postgresCredential() (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root needs an OS user named postgres to run the server: %w", err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("parse uid of user postgres: %w", err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("parse gid of user postgres: %w", err)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// create makes the directories and runs initdb.
func (c *Cluster) create(ctx context.Context, opts Options) error {
	for _, dir := range []string{c.dataDir(), c.sockDir()} {
		if err := os.Mkdir(dir, 0o700); err != nil {
			return fmt.Errorf("create cluster directory: %w", err)
		}
	}
	if c.cred != nil {
		err := filepath.Walk(c.root, func(path string, _ os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			return os.Chown(path, int(c.cred.Uid), int(c.cred.Gid))
		})
		if err != nil {
			return fmt.Errorf("give cluster directory to user postgres: %w", err)
		}
	}
	if _, err := c.run(ctx, "initdb", "-D", c.dataDir(), "-U", "postgres", "-A", "trust",
		"-E", "UTF8", "--no-locale", "--no-sync"); err != nil {
		return err
	}
	var conf strings.Builder
	conf.WriteString("\n# pgcluster settings\nlisten_addresses = '127.0.0.1'\n")
	fmt.Fprintf(&conf, "unix_socket_directories = %s\n", quoteConf(c.sockDir()))
	fmt.Fprintf(&conf, "max_connections = %d\n", opts.MaxConnections)
	// fsync off costs nothing a process crash can see: a commit's WAL is written to the OS
	// before the commit returns (synchronous_commit stays on), so Kill loses no commit. With
	// synchronous_commit off, commits of the last few hundred milliseconds died with the WAL
	// buffers at an immediate shutdown (a crash test saw its schema vanish).
	conf.WriteString("fsync = off\nfull_page_writes = off\n")
	names := make([]string, 0, len(opts.Params))
	for name := range opts.Params {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Fprintf(&conf, "%s = %s\n", name, quoteConf(opts.Params[name]))
	}
	f, err := os.OpenFile(filepath.Join(c.dataDir(), "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open postgresql.conf: %w", err)
	}
	if _, err := f.WriteString(conf.String()); err != nil {
		f.Close()
		return fmt.Errorf("write postgresql.conf: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write postgresql.conf: %w", err)
	}
	return nil
}

// startOnFreePort picks a free port and starts the server on it.
func (c *Cluster) startOnFreePort(ctx context.Context) error {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("find a free port: %w", err)
	}
	c.port = l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return fmt.Errorf("find a free port: %w", err)
	}
	_, err = c.run(ctx, "pg_ctl", "start", "-w", "-t", "60", "-D", c.dataDir(), "-l", c.logFile(),
		"-o", "-p "+strconv.Itoa(c.port))
	return err
}

// quoteConf quotes a value for postgresql.conf.
func quoteConf(v string) string {
	return "'" + strings.ReplaceAll(v, "'", "''") + "'"
}

// run runs a binary of the cluster, as the postgres user when needed, and returns its output.
// A failure's error holds the command's output and the tail of the server log.
func (c *Cluster) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(c.bindir, name), args...)
	cmd.Dir = c.root
	cmd.WaitDelay = 5 * time.Second
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PG") { // PGDATA, PGPORT, ... must not steer the cluster
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(out.String())
		if tail := c.logTail(); tail != "" {
			msg += "\nserver log:\n" + tail
		}
		return out.Bytes(), fmt.Errorf("%s %s: %s: %w", name, args[0], msg, err)
	}
	return out.Bytes(), nil
}

// logTail returns the last lines of the server log, or "".
func (c *Cluster) logTail() string {
	b, err := os.ReadFile(c.logFile())
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-15):], "\n")
}

func (c *Cluster) dataDir() string { return filepath.Join(c.root, "data") }
func (c *Cluster) sockDir() string { return filepath.Join(c.root, "sock") }
func (c *Cluster) logFile() string { return filepath.Join(c.root, "server.log") }

// Port returns the TCP port the server listens on at 127.0.0.1. It stays the same across
// [Cluster.Restart].
func (c *Cluster) Port() int { return c.port }

// ConnString returns a postgres:// URL for the superuser postgres and database db on
// 127.0.0.1 (no password, sslmode=disable). The database "postgres" always exists.
func (c *Cluster) ConnString(db string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User("postgres"),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(c.port)),
		Path:     "/" + db,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// Restart restarts the server with a fast shutdown (`pg_ctl restart -m fast`), closing every
// connection, and returns once it accepts connections again on the same port. It also starts a
// server stopped by [Cluster.Kill]. It fails after [Cluster.Stop].
func (c *Cluster) Restart(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.removed {
		return errors.New("restart cluster: cluster was stopped")
	}
	c.running = true // whatever happens, let Stop and Kill try to stop it
	if _, err := c.run(ctx, "pg_ctl", "restart", "-w", "-t", "60", "-m", "fast", "-D", c.dataDir(),
		"-l", c.logFile(), "-o", "-p "+strconv.Itoa(c.port)); err != nil {
		return err
	}
	c.logger.Info().Int("port", c.port).Msg("pgcluster: restarted")
	return nil
}

// SetParams appends settings to the server's postgresql.conf (the last setting of a name wins),
// to take effect at the next [Cluster.Restart]: hot_standby = off on a standby, for instance,
// which then refuses every connection with 57P03 until it is promoted.
func (c *Cluster) SetParams(params map[string]string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.removed {
		return errors.New("set cluster parameters: cluster was stopped")
	}
	names := make([]string, 0, len(params))
	for name := range params {
		names = append(names, name)
	}
	sort.Strings(names)
	var conf strings.Builder
	conf.WriteString("\n# pgcluster SetParams\n")
	for _, name := range names {
		fmt.Fprintf(&conf, "%s = %s\n", name, quoteConf(params[name]))
	}
	f, err := os.OpenFile(filepath.Join(c.dataDir(), "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("set cluster parameters: %w", err)
	}
	if _, err := f.WriteString(conf.String()); err != nil {
		f.Close()
		return fmt.Errorf("set cluster parameters: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("set cluster parameters: %w", err)
	}
	return nil
}

// Promote ends a standby's recovery (`pg_ctl promote -w`), as a failover to it does, and
// returns once it takes writes. It fails on a cluster that is not a standby.
func (c *Cluster) Promote(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.removed {
		return errors.New("promote cluster: cluster was stopped")
	}
	if _, err := c.run(ctx, "pg_ctl", "promote", "-w", "-t", "60", "-D", c.dataDir()); err != nil {
		return err
	}
	c.logger.Info().Int("port", c.port).Msg("pgcluster: promoted")
	return nil
}

// Kill stops the server at once (`pg_ctl stop -m immediate`), as a crash would: sessions end
// without cleanup and the next start runs crash recovery. The directory stays, so
// [Cluster.Restart] can start the server again; [Cluster.Stop] removes it. Kill on a stopped
// server does nothing.
func (c *Cluster) Kill() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopLocked("immediate")
}

// Stop shuts the server down (`pg_ctl stop -m fast`, which ends open sessions) and removes the
// cluster's directory, even when the shutdown failed. It is idempotent: later calls return nil.
func (c *Cluster) Stop() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.removed {
		return nil
	}
	c.removed = true
	err := c.stopLocked("fast")
	if rmErr := c.removeDirs(); rmErr != nil && err == nil {
		err = rmErr
	}
	c.logger.Info().Int("port", c.port).Err(err).Msg("pgcluster: stopped")
	return err
}

// stopLocked stops a running server with the given pg_ctl shutdown mode; c.mu must be held.
func (c *Cluster) stopLocked(mode string) error {
	if !c.running {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err := c.run(ctx, "pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", c.dataDir())
	if _, statErr := os.Stat(filepath.Join(c.dataDir(), "postmaster.pid")); err != nil && !errors.Is(statErr, fs.ErrNotExist) {
		return err // still running, or unknown
	}
	c.running = false
	return nil
}

// removeDirs removes the cluster's directory.
func (c *Cluster) removeDirs() error {
	if err := os.RemoveAll(c.root); err != nil {
		return fmt.Errorf("remove cluster directory: %w", err)
	}
	return nil
}
