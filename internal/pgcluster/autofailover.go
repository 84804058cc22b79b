package pgcluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
)

// ErrNoAutoFailover is returned (wrapped) by [StartAutoFailover] when pg_auto_failover is not
// installed: the pg_autoctl command and a PostgreSQL with the pgautofailover extension (Debian:
// apt-get install postgresql-15-auto-failover pg-auto-failover-cli).
var ErrNoAutoFailover = errors.New("pg_auto_failover not found: install pg_autoctl and the pgautofailover extension " +
	"(e.g. apt-get install postgresql-15-auto-failover pg-auto-failover-cli)")

// AutoFailoverOptions configures [StartAutoFailover]. The zero value is ready to use.
type AutoFailoverOptions struct {
	// Database is the database the nodes are created with (the formation's). Default "app".
	Database string
	// Logger receives one line per change of the formation. Default: no logging.
	Logger zerolog.Logger
}

// AutoFailover is a pg_auto_failover formation on loopback, for tests of a real failover: a
// monitor and two PostgreSQL nodes with synchronous replication, each kept alive by its own
// `pg_autoctl run`, all in one temporary directory, trusting every local connection. Its
// failure detection is shortened for tests (health checks every second; a node unhealthy
// after 2 s; the old primary's demotion awaited 3 s), so a crashed primary is replaced within
// seconds instead of about a minute. Its methods are safe for concurrent use.
type AutoFailover struct {
	root    string
	bindir  string // of the PostgreSQL that has the pgautofailover extension
	autoctl string
	cred    *syscall.Credential
	db      string
	logger  zerolog.Logger
	monitor *afNode
	nodes   []*afNode

	mu      sync.Mutex
	stopped bool
}

// afNode is one `pg_autoctl run` service: the monitor or a node.
type afNode struct {
	name string
	port int
	dir  string
	cmd  *exec.Cmd // nil while not running
	done chan struct{}
}

// autoFailoverTimeouts are the monitor's settings that make a test failover quick.
var autoFailoverTimeouts = map[string]string{
	"pgautofailover.health_check_period":               "1000",
	"pgautofailover.health_check_timeout":              "1000",
	"pgautofailover.health_check_max_retries":          "1",
	"pgautofailover.health_check_retry_delay":          "500",
	"pgautofailover.node_considered_unhealthy_timeout": "2000",
	"pgautofailover.primary_demote_timeout":            "3000",
}

// StartAutoFailover creates and starts a formation (about 10 s) and returns once one node is
// primary and the other a secondary. The caller must call [AutoFailover.Stop]. On failure
// nothing is left running. The error wraps [ErrNoAutoFailover] when pg_auto_failover is not
// installed, or not for the PostgreSQL that LANES_PG_BINDIR names (Debian builds it for
// PostgreSQL 15 only).
func StartAutoFailover(ctx context.Context, opts AutoFailoverOptions) (*AutoFailover, error) {
	autoctl, err := exec.LookPath("pg_autoctl")
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoAutoFailover, err)
	}
	var bindir string
	if dir := os.Getenv("LANES_PG_BINDIR"); dir != "" {
		// The formation must be of the PostgreSQL the tests are told to use.
		if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "lib", "pgautofailover.so")); err != nil {
			return nil, fmt.Errorf("%w: none for the PostgreSQL of LANES_PG_BINDIR=%s", ErrNoAutoFailover, dir)
		}
		bindir = dir
	} else {
		exts, _ := filepath.Glob("/usr/lib/postgresql/*/lib/pgautofailover.so")
		for _, so := range exts {
			if dir := filepath.Join(filepath.Dir(filepath.Dir(so)), "bin"); missingBinary(dir) == "" {
				bindir = dir
			}
		}
	}
	if bindir == "" {
		return nil, fmt.Errorf("%w: no PostgreSQL with the pgautofailover extension in /usr/lib/postgresql", ErrNoAutoFailover)
	}
	if opts.Database == "" {
		opts.Database = "app"
	}
	f := &AutoFailover{bindir: bindir, autoctl: autoctl, db: opts.Database, logger: opts.Logger}
	if os.Geteuid() == 0 {
		if f.cred, err = postgresCredential(); err != nil {
			return nil, err
		}
	}
	if f.root, err = os.MkdirTemp("", "lanes-autofailover-"); err != nil {
		return nil, fmt.Errorf("create formation directory: %w", err)
	}
	if err := f.start(ctx); err != nil {
		_ = f.Stop()
		return nil, err
	}
	f.logger.Info().Int("monitor_port", f.monitor.port).Int("node1_port", f.nodes[0].port).Int("node2_port", f.nodes[1].port).
		Str("dir", f.root).Msg("pgcluster: pg_auto_failover formation started")
	return f, nil
}

func (f *AutoFailover) start(ctx context.Context) error {
	if f.cred != nil {
		if err := os.Chown(f.root, int(f.cred.Uid), int(f.cred.Gid)); err != nil {
			return fmt.Errorf("give formation directory to user postgres: %w", err)
		}
	}
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	f.monitor = &afNode{name: "monitor", port: ports[0], dir: filepath.Join(f.root, "monitor")}
	for i := range 2 {
		name := "node" + strconv.Itoa(i+1)
		f.nodes = append(f.nodes, &afNode{name: name, port: ports[i+1], dir: filepath.Join(f.root, name)})
	}
	if _, err := f.autoctlRun(ctx, "create", "monitor", "--pgdata", f.monitor.dir, "--pgport", strconv.Itoa(f.monitor.port),
		"--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl", "--pgctl", filepath.Join(f.bindir, "pg_ctl")); err != nil {
		return err
	}
	if err := f.run(f.monitor); err != nil {
		return err
	}
	if err := f.tuneMonitor(ctx); err != nil {
		return err
	}
	monitorURI := fmt.Sprintf("postgres://autoctl_node@127.0.0.1:%d/pg_auto_failover?sslmode=disable", f.monitor.port)
	for _, n := range f.nodes {
		if _, err := f.autoctlRun(ctx, "create", "postgres", "--pgdata", n.dir, "--pgport", strconv.Itoa(n.port),
			"--hostname", "127.0.0.1", "--listen", "127.0.0.1", "--name", n.name, "--dbname", f.db, "--monitor", monitorURI,
			"--auth", "trust", "--no-ssl", "--pgctl", filepath.Join(f.bindir, "pg_ctl")); err != nil {
			return err
		}
		if err := f.run(n); err != nil {
			return err
		}
	}
	_, err = f.WaitStable(ctx)
	return err
}

// tuneMonitor shortens the monitor's failure detection (see autoFailoverTimeouts).
func (f *AutoFailover) tuneMonitor(ctx context.Context) error {
	var conn *pgx.Conn
	var err error
	for deadline := time.Now().Add(time.Minute); ; { // the monitor starts in the background
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		conn, err = pgx.Connect(cctx, fmt.Sprintf("postgres://postgres@127.0.0.1:%d/pg_auto_failover?sslmode=disable", f.monitor.port))
		cancel()
		if err == nil || ctx.Err() != nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("connect to the pg_auto_failover monitor: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for name, value := range autoFailoverTimeouts {
		if _, err := conn.Exec(ctx, fmt.Sprintf("alter system set %s = %s", name, value)); err != nil {
			return fmt.Errorf("tune the pg_auto_failover monitor: %w", err)
		}
	}
	if _, err := conn.Exec(ctx, "select pg_reload_conf()"); err != nil {
		return fmt.Errorf("tune the pg_auto_failover monitor: %w", err)
	}
	return nil
}

// freePorts returns n distinct free TCP ports of 127.0.0.1.
func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// prepare makes cmd (pg_autoctl) run as the postgres user when needed, in a process group of
// its own, with its configuration kept in the formation's directory.
func (f *AutoFailover) prepare(cmd *exec.Cmd) *exec.Cmd {
	cmd.Dir = f.root
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: f.cred, Setpgid: true}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PG") && !strings.HasPrefix(kv, "XDG_") && !strings.HasPrefix(kv, "PATH=") && !strings.HasPrefix(kv, "HOME=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "PATH="+f.bindir+":"+os.Getenv("PATH"), "HOME="+f.root,
		"XDG_CONFIG_HOME="+filepath.Join(f.root, "config"), "XDG_DATA_HOME="+filepath.Join(f.root, "data"),
		"XDG_RUNTIME_DIR="+filepath.Join(f.root, "run"))
	return cmd
}

// autoctlRun runs one pg_autoctl command to its end and returns its output.
func (f *AutoFailover) autoctlRun(ctx context.Context, args ...string) ([]byte, error) {
	cmd := f.prepare(exec.CommandContext(ctx, f.autoctl, args...))
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("pg_autoctl %s: %s: %w", strings.Join(args[:min(2, len(args))], " "), tail(out.String(), 15), err)
	}
	return out.Bytes(), nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// run starts `pg_autoctl run` for n in a process group of its own (its Postgres included),
// logging to n's log file.
func (f *AutoFailover) run(n *afNode) error {
	log, err := os.OpenFile(filepath.Join(f.root, n.name+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("open %s log: %w", n.name, err)
	}
	cmd := f.prepare(exec.Command(f.autoctl, "run", "--pgdata", n.dir)) // it outlives the caller's context
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("pg_autoctl run %s: %w", n.name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait() // it ends when stopped or killed; Stop and Crash say why
		log.Close()
		close(done)
	}()
	f.mu.Lock()
	n.cmd, n.done = cmd, done
	f.mu.Unlock()
	return nil
}

// NodeState is one node as the monitor sees it.
type NodeState struct {
	Name     string `json:"nodename"`
	Port     int    `json:"nodeport"`
	Health   int    `json:"health"`
	Reported string `json:"current_group_state"`
	Assigned string `json:"assigned_group_state"`
}

// State returns the nodes as the monitor sees them (`pg_autoctl show state --json`).
func (f *AutoFailover) State(ctx context.Context) ([]NodeState, error) {
	out, err := f.autoctlRun(ctx, "show", "state", "--pgdata", f.monitor.dir, "--json")
	if err != nil {
		return nil, err
	}
	var nodes []NodeState
	if err := json.Unmarshal(out[bytes.IndexByte(out, '['):], &nodes); err != nil {
		return nil, fmt.Errorf("pg_autoctl show state: %w: %s", err, out)
	}
	return nodes, nil
}

// WaitStable waits until one node is primary and every other one a secondary, as reported and
// assigned, and returns the primary's name.
func (f *AutoFailover) WaitStable(ctx context.Context) (string, error) {
	var last []NodeState
	for {
		nodes, err := f.State(ctx)
		if err == nil {
			last = nodes
			primary, secondaries := "", 0
			for _, n := range nodes {
				switch {
				case n.Reported == "primary" && n.Assigned == "primary":
					primary = n.Name
				case n.Reported == "secondary" && n.Assigned == "secondary":
					secondaries++
				}
			}
			if primary != "" && secondaries == len(nodes)-1 {
				return primary, nil
			}
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("pg_auto_failover formation not stable (%+v): %w", last, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// URL returns the URL that finds the primary whichever node it is: both nodes, in order, with
// target_session_attrs=read-write, as the superuser postgres.
func (f *AutoFailover) URL(db string) string {
	hosts := make([]string, len(f.nodes))
	for i, n := range f.nodes {
		hosts[i] = net.JoinHostPort("127.0.0.1", strconv.Itoa(n.port))
	}
	u := url.URL{Scheme: "postgres", User: url.User("postgres"), Host: strings.Join(hosts, ","), Path: "/" + db,
		RawQuery: "sslmode=disable&target_session_attrs=read-write"}
	return u.String()
}

// NodeURL returns the URL of one node (node1 or node2) alone.
func (f *AutoFailover) NodeURL(name, db string) string {
	for _, n := range f.nodes {
		if n.name == name {
			u := url.URL{Scheme: "postgres", User: url.User("postgres"), Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(n.port)),
				Path: "/" + db, RawQuery: "sslmode=disable"}
			return u.String()
		}
	}
	return ""
}

// Failover runs a planned failover (`pg_autoctl perform failover`, which waits for it) and
// returns once the formation is stable again, with the new primary's name.
func (f *AutoFailover) Failover(ctx context.Context) (string, error) {
	if _, err := f.autoctlRun(ctx, "perform", "failover", "--pgdata", f.monitor.dir); err != nil {
		return "", err
	}
	primary, err := f.WaitStable(ctx)
	if err == nil {
		f.logger.Info().Str("primary", primary).Msg("pgcluster: planned failover done")
	}
	return primary, err
}

// Crash kills the named node as a machine crash would: its pg_autoctl and its PostgreSQL
// (SIGKILL to their process group: the postmaster stays in its pg_autoctl's group; its
// sessions end with it). The monitor then
// promotes the other node within seconds. Rejoin starts the node again.
func (f *AutoFailover) Crash(name string) error {
	n := f.node(name)
	if n == nil {
		return fmt.Errorf("crash: no node %q", name)
	}
	f.mu.Lock()
	cmd, done := n.cmd, n.done
	n.cmd = nil
	f.mu.Unlock()
	if cmd == nil {
		return fmt.Errorf("crash: node %s is not running", name)
	}
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("crash node %s: %w", name, err)
	}
	<-done
	f.logger.Info().Str("node", name).Msg("pgcluster: node crashed")
	return nil
}

// Rejoin starts a crashed node's pg_autoctl again, which rejoins the formation as a secondary
// (rewinding it if needed), and returns once the formation is stable.
func (f *AutoFailover) Rejoin(ctx context.Context, name string) error {
	n := f.node(name)
	if n == nil {
		return fmt.Errorf("rejoin: no node %q", name)
	}
	if err := f.run(n); err != nil {
		return err
	}
	_, err := f.WaitStable(ctx)
	return err
}

func (f *AutoFailover) node(name string) *afNode {
	for _, n := range f.nodes {
		if n.name == name {
			return n
		}
	}
	return nil
}

// Stop stops every node and the monitor (SIGTERM to each pg_autoctl, which stops its
// PostgreSQL; SIGKILL after 30 s) and removes the formation's directory. It is idempotent.
func (f *AutoFailover) Stop() error {
	f.mu.Lock()
	if f.stopped {
		f.mu.Unlock()
		return nil
	}
	f.stopped = true
	f.mu.Unlock()
	var errs []error
	for _, n := range append(append([]*afNode{}, f.nodes...), f.monitor) {
		if n == nil {
			continue
		}
		f.mu.Lock()
		cmd, done := n.cmd, n.done
		n.cmd = nil
		f.mu.Unlock()
		if cmd != nil {
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-done
				errs = append(errs, fmt.Errorf("stop %s: pg_autoctl did not stop within 30 s: killed", n.name))
			}
		}
	}
	if err := os.RemoveAll(f.root); err != nil {
		errs = append(errs, fmt.Errorf("remove formation directory: %w", err))
	}
	f.logger.Info().Msg("pgcluster: pg_auto_failover formation stopped")
	return errors.Join(errs...)
}
