// Package cli is the `lanes` command line: global flags and environment variables, the
// migrate, status, wait and new commands (this file), serve (serve.go) and demo (demo.go).
//
// Main is the whole program behind a thin main: it never exits the process, it returns the
// exit code. Results go to stdout; logs (zerolog, JSON or console) and errors go to stderr.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/migrations"
	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

// Exit codes returned by Main.
const (
	// ExitOK: the command succeeded (wait: the lane reached the version; serve: stopped by
	// SIGINT or SIGTERM).
	ExitOK = 0
	// ExitError: bad configuration, database unreachable, a failed migration, or for wait a
	// recorded permanent failure of a migration the wait depends on.
	ExitError = 1
	// ExitUsage: unknown command or flag, missing or malformed argument, unknown lane.
	ExitUsage = 2
	// ExitTimeout: wait's --timeout expired before the lane reached the version.
	ExitTimeout = 3
)

// defaultConnectTimeout bounds each connection attempt when the URL sets no connect_timeout.
const defaultConnectTimeout = 10 * time.Second

const usageText = `lanes applies PostgreSQL migrations in lanes: blocking lanes are applied before a replica
is ready, background lanes after it, by one replica, and every replica learns of a lane's
completion through LISTEN/NOTIFY.

Usage:
  lanes [global flags] COMMAND [command flags]

Commands:
  migrate [--lane NAME]... [--allow-drift]
                             apply the pending migrations of every lane (or of the named
                             lanes) in lane order, in the foreground
  status [--json]            per lane: name, mode, version table, applied version, latest
                             version known to this binary, state, last error, applied files
                             changed since (drift); --json prints {"lanes":[...]}; exits 0
                             even when lanes are pending or failed
  wait --lane NAME [--version N] [--timeout D]
                             block, listening on the NOTIFY channel, until the lane has
                             version >= N (default: its latest version known to this binary);
                             applies nothing
  new --lane NAME TITLE      create the next numbered file NNN_title.sql in the lane's folder
                             (needs --migrations) and print its path
  serve [--addr ADDR]        run one app replica: HTTP first (GET /healthz, GET /readyz: 503
                             until the blocking lanes are applied, then 200; GET /lanes: the
                             status JSON), then the blocking lanes, then the background lanes
                             on whichever replica wins each lane's lock; stops on SIGINT/SIGTERM
  demo                       play the demo story: three replicas, a fast lane, a 5-second slow
                             lane whose completion reaches every replica through LISTEN/NOTIFY;
                             always the embedded demo migrations, in a database it creates and
                             drops (on DATABASE_URL's server, else the local server, else a
                             throwaway cluster it starts and stops)

Global flags (each also read from an environment variable; the flag wins):
  --database-url URL    DATABASE_URL       PostgreSQL URL or keyword/value string; unset: libpq
                                           defaults (PGHOST, PGPORT, PGUSER, ..., local socket)
  --migrations DIR      LANES_MIGRATIONS   folder holding one subfolder per lane; unset: the
                                           embedded demo migrations
  --lanes LIST          LANES_LANES        lanes in order as name:mode,... with mode blocking or
                                           background (default fast:blocking,slow:background)
  --channel NAME        LANES_CHANNEL      NOTIFY channel (default lanes_done)
  --log-format FORMAT   LANES_LOG_FORMAT   json or console (default: console when stderr is a
                                           terminal, json otherwise)

Command flags:
  migrate --lane NAME   apply only this lane (repeatable); the lanes still run in lane order
  migrate --allow-drift apply pending migrations although applied files changed since they were
                        applied (by default migrate refuses and names the files)
  status --json         print JSON instead of a table
  wait --lane NAME      the lane to wait for (required)
  wait --version N      the version to reach (default: the lane's latest known to this binary)
  wait --timeout D      give up after D, such as 30s or 5m (default 0: no limit)
  new --lane NAME       the lane whose folder gets the file (required)
  serve --addr ADDR     listen address; env LANES_ADDR (default :8080)

Tuning for serve and wait (environment variables only; unset or 0: the default; values are Go
durations such as 500ms, 2s or 1m):
  LANES_PING_INTERVAL      how often the LISTEN connection is checked (a ping, or for a replica
                           waiting for another's background lane, a test of that lane's lock):
                           a dead or half-open connection is replaced, and a lane whose applier
                           died is taken over (default 5s)
  LANES_TAKEOVER_INTERVAL  serve: the longest a replica waiting for another's background lane
                           goes without trying the lane's lock itself, a backstop to the check
                           above (default 1m, +-20 %)
  LANES_POLL_INTERVAL      how often the lanes are re-read while LISTEN is unavailable (a hot
                           standby, a pooler in transaction mode) (default 5s)
  LANES_RELISTEN_INTERVAL  how often LISTEN is tried again while polling (default 1m)

Global flags may also follow the command. Results go to stdout; logs and errors to stderr.
Passwords are never printed: a server is shown as host, port, user and database.

Exit codes:
  0  success (wait: the lane reached the version; serve: stopped by SIGINT or SIGTERM)
  1  error: bad configuration, database unreachable, a failed migration, or (wait) a recorded
     permanent failure of a migration the wait depends on
  2  usage error: unknown command or flag, missing argument, unknown lane
  3  wait: --timeout expired before the lane reached the version
`

// Main runs the lanes command line with args (the arguments after the program name) and returns
// the process exit code (ExitOK, ExitError, ExitUsage or ExitTimeout). Environment variables are
// read from the process. Cancelling ctx stops the running command: serve then shuts down
// gracefully and returns ExitOK.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return run(ctx, args, &env{
		stdout:   stdout,
		stderr:   stderr,
		getenv:   os.Getenv,
		terminal: isTerminal(stderr),
		now:      time.Now,
		demo:     defaultDemoOptions(),
	})
}

// env is what one run of the command line sees of its process; tests inject their own.
type env struct {
	stdout, stderr io.Writer
	getenv         func(string) string
	terminal       bool             // stderr is a terminal
	now            func() time.Time // durations in logs and the migrators' history times
	demo           demoOptions
	onListen       func(net.Addr) // serve: called once the HTTP listener is bound; may be nil
}

// isTerminal reports whether w is a character device such as a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// exitError carries an exit code other than ExitError.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func usageErrorf(format string, args ...any) error {
	return &exitError{code: ExitUsage, err: fmt.Errorf(format, args...)}
}

// globals holds the global flags as given on the command line.
type globals struct {
	databaseURL, migrations, lanes, channel, logFormat string
}

// register defines the global flags on fs. The current values are the defaults, so defining
// them on a command's FlagSet keeps what the global FlagSet parsed.
func (g *globals) register(fs *flag.FlagSet) {
	fs.StringVar(&g.databaseURL, "database-url", g.databaseURL, "")
	fs.StringVar(&g.migrations, "migrations", g.migrations, "")
	fs.StringVar(&g.lanes, "lanes", g.lanes, "")
	fs.StringVar(&g.channel, "channel", g.channel, "")
	fs.StringVar(&g.logFormat, "log-format", g.logFormat, "")
}

// settings are the global settings once flags and environment variables are resolved.
type settings struct {
	databaseURL string // "" means libpq defaults
	migrations  string // "" means the embedded demo migrations
	lanes       string
	channel     string
	logFormat   string // "json" or "console"
}

// resolve takes each global from its flag when the flag was given (set lists the flags given),
// else from its environment variable.
func (g *globals) resolve(getenv func(string) string, set map[string]bool, terminal bool) (settings, error) {
	pick := func(name, value, envName string) string {
		if set[name] {
			return value
		}
		return getenv(envName)
	}
	s := settings{
		databaseURL: pick("database-url", g.databaseURL, "DATABASE_URL"),
		migrations:  pick("migrations", g.migrations, "LANES_MIGRATIONS"),
		lanes:       pick("lanes", g.lanes, "LANES_LANES"),
		channel:     pick("channel", g.channel, "LANES_CHANNEL"),
		logFormat:   strings.ToLower(strings.TrimSpace(pick("log-format", g.logFormat, "LANES_LOG_FORMAT"))),
	}
	switch s.logFormat {
	case "json", "console":
	case "":
		s.logFormat = "json"
		if terminal {
			s.logFormat = "console"
		}
	default:
		return s, usageErrorf("invalid log format %q: want json or console", s.logFormat)
	}
	if s.channel == "" {
		s.channel = migrator.DefaultChannel
	}
	return s, nil
}

// logTimeFormat is RFC 3339 with milliseconds: the demo's story is told in milliseconds.
const logTimeFormat = "2006-01-02T15:04:05.000Z07:00"

// newLogger returns the zerolog logger of a run, at info level, writing to w. Each line's
// "time" comes from now (set by a hook rather than zerolog's global time format and clock).
func newLogger(format string, w io.Writer, terminal bool, now func() time.Time) zerolog.Logger {
	w = zerolog.SyncWriter(w)
	if format == "console" {
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: "15:04:05.000", NoColor: !terminal}
	}
	stamp := zerolog.HookFunc(func(e *zerolog.Event, _ zerolog.Level, _ string) {
		e.Str(zerolog.TimestampFieldName, now().UTC().Format(logTimeFormat))
	})
	return zerolog.New(w).Level(zerolog.InfoLevel).Hook(stamp)
}

// command is one command being run: its environment, settings and logger.
type command struct {
	name       string
	env        *env
	set        settings
	log        zerolog.Logger
	allowDrift bool // migrate --allow-drift
}

// tuning is what the LANES_*_INTERVAL environment variables set; zero fields keep the
// defaults of app.Config and notifier.Config.
type tuning struct {
	takeover, ping, poll, relisten time.Duration
}

// tuning reads the LANES_*_INTERVAL environment variables of serve and wait.
func (c *command) tuning() (tuning, error) {
	var tu tuning
	for _, v := range []struct {
		name string
		dst  *time.Duration
	}{
		{"LANES_TAKEOVER_INTERVAL", &tu.takeover},
		{"LANES_PING_INTERVAL", &tu.ping},
		{"LANES_POLL_INTERVAL", &tu.poll},
		{"LANES_RELISTEN_INTERVAL", &tu.relisten},
	} {
		s := strings.TrimSpace(c.env.getenv(v.name))
		if s == "" {
			continue
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			return tu, usageErrorf("invalid %s=%q: want a duration such as 500ms or 2s", v.name, s)
		}
		*v.dst = d
	}
	return tu, nil
}

// notifierConfig returns the LISTEN settings of the tuning variables.
func (tu tuning) notifierConfig() notifier.Config {
	return notifier.Config{PingInterval: tu.ping, PollInterval: tu.poll, RelistenInterval: tu.relisten}
}

// connConfig parses the database URL (libpq defaults when empty) and bounds connection attempts.
func (c *command) connConfig() (*pgx.ConnConfig, error) {
	cfg, err := pgx.ParseConfig(c.set.databaseURL)
	if err != nil {
		return nil, fmt.Errorf("invalid database URL (--database-url or DATABASE_URL): %w", err)
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = defaultConnectTimeout
	}
	return cfg, nil
}

// target describes a connection without its password. An unset database is shown as the user
// name, which is what the server uses then.
func target(cfg *pgx.ConnConfig) string {
	db := cfg.Database
	if db == "" {
		db = cfg.User
	}
	return fmt.Sprintf("host=%s port=%d user=%s database=%s", cfg.Host, cfg.Port, cfg.User, db)
}

// laneSpecs returns the lanes to load: from the --migrations folder, else the embedded demo
// migrations (whose slow lane loads data for loadDuration), in the order --lanes declares.
func (c *command) laneSpecs(loadDuration time.Duration) ([]migrator.Lane, error) {
	decls, err := migrator.ParseLaneDecls(c.set.lanes)
	if err != nil {
		return nil, usageErrorf("invalid lanes (--lanes or LANES_LANES): %w", err)
	}
	if c.set.migrations == "" {
		return embeddedLanes(loadDuration, decls)
	}
	st, err := os.Stat(c.set.migrations)
	if err != nil {
		return nil, fmt.Errorf("migrations folder (--migrations or LANES_MIGRATIONS): %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("migrations folder (--migrations or LANES_MIGRATIONS) %s is not a folder", c.set.migrations)
	}
	lanes, err := migrator.LanesFromFS(os.DirFS(c.set.migrations), decls)
	if err != nil {
		return nil, fmt.Errorf("migrations folder %s: %w", c.set.migrations, err)
	}
	return lanes, nil
}

// embeddedLanes returns the embedded demo lanes, reordered and with the modes given by decls
// when there are any.
func embeddedLanes(loadDuration time.Duration, decls []migrator.LaneDecl) ([]migrator.Lane, error) {
	all := migrations.Lanes(loadDuration)
	if len(decls) == 0 {
		return all, nil
	}
	var out []migrator.Lane
	for _, d := range decls {
		i := slices.IndexFunc(all, func(l migrator.Lane) bool { return l.Name == d.Name })
		if i < 0 {
			return nil, usageErrorf("the embedded demo migrations have no lane %q (they have fast and slow): set --migrations", d.Name)
		}
		l := all[i]
		l.Mode = d.Mode
		out = append(out, l)
	}
	return out, nil
}

// migrator loads the lanes and returns a Migrator for the configured database. It does not
// connect.
func (c *command) migrator() (*migrator.Migrator, error) {
	cfg, err := c.connConfig()
	if err != nil {
		return nil, err
	}
	lanes, err := c.laneSpecs(5 * time.Second)
	if err != nil {
		return nil, err
	}
	m, err := migrator.New(cfg, lanes, migrator.Config{Channel: c.set.channel, Logger: c.log, Now: c.env.now, AllowDrift: c.allowDrift})
	if err != nil {
		return nil, fmt.Errorf("load migrations: %w", err)
	}
	return m, nil
}

// connect opens one connection with the Migrator's configuration.
func connect(ctx context.Context, m *migrator.Migrator) (*pgx.Conn, error) {
	cfg := m.ConnConfig()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", target(cfg), err)
	}
	return conn, nil
}

// lanesFlag collects a repeatable --lane flag.
type lanesFlag []string

func (f *lanesFlag) String() string { return strings.Join(*f, ",") }
func (f *lanesFlag) Set(v string) error {
	*f = append(*f, v)
	return nil
}

// commandBody runs a command with its positional arguments, once its flags are parsed.
type commandBody func(ctx context.Context, c *command, args []string) error

// commands maps each command to the function defining its flags on a FlagSet and returning
// its body.
var commands = map[string]func(fs *flag.FlagSet) commandBody{
	"migrate": migrateFlags,
	"status":  statusFlags,
	"wait":    waitFlags,
	"new":     newFlags,
	"serve":   serveFlags,
	"demo":    demoFlags,
}

// run is Main with an injectable environment.
func run(ctx context.Context, args []string, e *env) int {
	var g globals
	set := map[string]bool{}
	top := flag.NewFlagSet("lanes", flag.ContinueOnError)
	top.SetOutput(io.Discard)
	g.register(top)
	if err := top.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(e.stdout, usageText)
			return ExitOK
		}
		return usageFail(e, err)
	}
	top.Visit(func(f *flag.Flag) { set[f.Name] = true })
	rest := top.Args()
	if len(rest) == 0 {
		return usageFail(e, errors.New("no command given"))
	}
	name := rest[0]
	if name == "help" {
		fmt.Fprint(e.stdout, usageText)
		return ExitOK
	}
	define, ok := commands[name]
	if !ok {
		return usageFail(e, fmt.Errorf("unknown command %q", name))
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	g.register(fs)
	body := define(fs)
	positional, err := parseInterspersed(fs, rest[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(e.stdout, usageText)
			return ExitOK
		}
		return usageFail(e, fmt.Errorf("%s: %w", name, err))
	}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	s, err := g.resolve(e.getenv, set, e.terminal)
	if err != nil {
		return usageFail(e, err)
	}
	logTo := e.stderr
	if name == "demo" {
		logTo = e.stdout // the demo's log is its output: the story, one line per event
	}
	c := &command{name: name, env: e, set: s, log: newLogger(s.logFormat, logTo, e.terminal, e.now)}
	err = body(ctx, c, positional)
	if err == nil {
		return ExitOK
	}
	code := ExitError
	var xe *exitError
	if errors.As(err, &xe) {
		code = xe.code
	}
	msg := redact(err.Error(), s.databaseURL)
	if s.logFormat == "json" {
		// Errors go to stderr, even for the demo whose story goes to stdout.
		errLog := newLogger(s.logFormat, e.stderr, e.terminal, e.now)
		errLog.Error().Str("command", name).Int("exit_code", code).Str("error", msg).Msg(name + " failed")
	} else {
		fmt.Fprintf(e.stderr, "lanes %s: %s\n", name, msg)
	}
	if code == ExitUsage {
		fmt.Fprintln(e.stderr, "Run 'lanes --help' for usage.")
	}
	return code
}

// usageFail reports a usage error found before any command ran.
func usageFail(e *env, err error) int {
	fmt.Fprintf(e.stderr, "lanes: %s\nRun 'lanes --help' for usage.\n", redact(err.Error(), ""))
	return ExitUsage
}

// parseInterspersed parses flags that may come before, between or after positional arguments,
// and returns the positional ones. Everything after "--" is positional.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, nil
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(positional, rest...), nil
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

var (
	urlPassword     = regexp.MustCompile(`(?i)(postgres(?:ql)?://[^:/@\s]*):[^@\s]*@`)
	keywordPassword = regexp.MustCompile(`(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)
)

// redact removes passwords from s: those of postgres:// URLs and password= keywords it
// contains, and the password of databaseURL wherever it appears.
func redact(s, databaseURL string) string {
	var secrets []string
	if u, err := url.Parse(databaseURL); err == nil && u.User != nil {
		if p, ok := u.User.Password(); ok {
			secrets = append(secrets, p)
		}
	}
	for _, m := range urlPassword.FindAllString(databaseURL, -1) {
		if i := strings.LastIndex(m[:len(m)-1], ":"); i >= 0 {
			secrets = append(secrets, m[i+1:len(m)-1])
		}
	}
	for _, m := range keywordPassword.FindAllStringSubmatch(databaseURL, -1) {
		secrets = append(secrets, strings.Trim(m[2], "'"))
	}
	if cfg, err := pgconn.ParseConfig(databaseURL); err == nil && cfg.Password != "" {
		secrets = append(secrets, cfg.Password)
	}
	s = urlPassword.ReplaceAllString(s, "$1:xxxxx@")
	s = keywordPassword.ReplaceAllString(s, "${1}xxxxx")
	for _, p := range secrets {
		if len(p) >= 3 {
			s = strings.ReplaceAll(s, p, "xxxxx")
			if q := url.QueryEscape(p); q != p {
				s = strings.ReplaceAll(s, q, "xxxxx")
			}
		}
	}
	return s
}

// ----- migrate

func migrateFlags(fs *flag.FlagSet) commandBody {
	var lanes lanesFlag
	fs.Var(&lanes, "lane", "")
	allowDrift := fs.Bool("allow-drift", false, "")
	return func(ctx context.Context, c *command, args []string) error {
		if len(args) > 0 {
			return usageErrorf("unexpected arguments %q", args)
		}
		c.allowDrift = *allowDrift
		return runMigrate(ctx, c, lanes)
	}
}

// runMigrate applies the pending migrations of the named lanes (all when none) in lane order.
func runMigrate(ctx context.Context, c *command, only []string) error {
	m, err := c.migrator()
	if err != nil {
		return err
	}
	var names []string
	for _, l := range m.Lanes() {
		names = append(names, l.Name)
	}
	for _, n := range only {
		if !slices.Contains(names, n) {
			return usageErrorf("unknown lane %q (lanes: %s)", n, strings.Join(names, ", "))
		}
	}
	c.log.Info().Str("target", target(m.ConnConfig())).Msg("applying db migrations")
	for _, name := range names {
		if len(only) > 0 && !slices.Contains(only, name) {
			continue
		}
		res, err := m.Migrate(ctx, name)
		if err != nil {
			return err
		}
		ev := c.log.Info().Str("lane", name).Int32("from", res.From).Int32("version", res.To).Int32("latest", res.Latest).Int("applied", res.Applied)
		if res.Applied == 0 {
			ev.Msg("lane already up to date")
		} else {
			ev.Msg("lane migrated")
		}
	}
	return nil
}

// ----- status

func statusFlags(fs *flag.FlagSet) commandBody {
	asJSON := fs.Bool("json", false, "")
	return func(ctx context.Context, c *command, args []string) error {
		if len(args) > 0 {
			return usageErrorf("unexpected arguments %q", args)
		}
		return runStatus(ctx, c, *asJSON)
	}
}

// statusJSON is what status --json prints.
type statusJSON struct {
	Lanes []migrator.LaneStatus `json:"lanes"`
}

func runStatus(ctx context.Context, c *command, asJSON bool) error {
	m, err := c.migrator()
	if err != nil {
		return err
	}
	conn, err := connect(ctx, m)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	lanes, err := m.Status(ctx, conn)
	if err != nil {
		return err
	}
	if err := m.AddDrift(ctx, conn, lanes); err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(c.env.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(statusJSON{Lanes: lanes}); err != nil {
			return fmt.Errorf("write status: %w", err)
		}
		return nil
	}
	tw := tabwriter.NewWriter(c.env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LANE\tMODE\tVERSION\tLATEST\tSTATE\tLOCKED\tVERSION TABLE\tERROR")
	for _, l := range lanes {
		locked := "no"
		if l.Locked {
			locked = "yes"
		}
		problem := oneLine(l.Error)
		if len(l.Drift) > 0 {
			problem = strings.TrimSpace("changed since applied: " + strings.Join(l.Drift, ", ") + "; " + problem)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\n", l.Name, l.Mode, l.Version, l.Latest, l.State, locked, l.VersionTable, problem)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// ----- wait

func waitFlags(fs *flag.FlagSet) commandBody {
	lane := fs.String("lane", "", "")
	version := fs.Int("version", -1, "")
	timeout := fs.Duration("timeout", 0, "")
	return func(ctx context.Context, c *command, args []string) error {
		switch {
		case len(args) > 0:
			return usageErrorf("unexpected arguments %q", args)
		case *lane == "":
			return usageErrorf("--lane is required")
		case *version < -1 || *version > 1<<31-1:
			return usageErrorf("--version %d is out of range", *version)
		case *timeout < 0:
			return usageErrorf("--timeout must not be negative")
		}
		return runWait(ctx, c, *lane, *version, *timeout)
	}
}

// runWait blocks until the lane reaches the version, listening on the NOTIFY channel and
// re-reading the version tables on every notification (and on every reconnect). It applies
// nothing.
func runWait(ctx context.Context, c *command, lane string, version int, timeout time.Duration) error {
	tu, err := c.tuning()
	if err != nil {
		return err
	}
	m, err := c.migrator()
	if err != nil {
		return err
	}
	lanes := m.Lanes()
	idx := slices.IndexFunc(lanes, func(l migrator.LaneInfo) bool { return l.Name == lane })
	if idx < 0 {
		var names []string
		for _, l := range lanes {
			names = append(names, l.Name)
		}
		return usageErrorf("unknown lane %q (lanes: %s)", lane, strings.Join(names, ", "))
	}
	info := lanes[idx]
	want := info.Latest
	if version >= 0 {
		want = int32(version)
	}
	wctx, cancel := ctx, context.CancelFunc(func() {})
	if timeout > 0 {
		wctx, cancel = context.WithTimeout(ctx, timeout)
	}
	defer cancel()
	timedOut := func(at string) error {
		return &exitError{code: ExitTimeout, err: fmt.Errorf("timed out after %s: lane %q %s, waiting for version %d", timeout, lane, at, want)}
	}

	// The handler runs on the listener's goroutine; it keeps only the newest state in updates,
	// so it never blocks.
	updates := make(chan migrator.LaneStatus, 1)
	handler := func(ctx context.Context, conn *pgx.Conn, n *pgconn.Notification) error {
		if n != nil {
			if _, err := migrator.ParseEvent(n.Payload); err != nil {
				return nil // not a lanes event: nothing to re-read
			}
		}
		st, err := m.Status(ctx, conn)
		if err != nil {
			return err
		}
		select {
		case <-updates:
		default:
		}
		updates <- st[idx]
		return nil
	}
	ncfg := tu.notifierConfig()
	ncfg.Channel, ncfg.Logger = m.Channel(), c.log.With().Str("component", "notifier").Logger()
	l, err := notifier.New(m.ConnConfig(), ncfg, handler)
	if err != nil {
		return err
	}
	if err := l.Start(wctx); err != nil {
		if timeout > 0 && wctx.Err() != nil && ctx.Err() == nil {
			return timedOut("could not be read")
		}
		return fmt.Errorf("listen on %s: %w", target(m.ConnConfig()), err)
	}
	defer l.Stop()
	start := c.env.now()
	var last migrator.LaneStatus
	logged := false
	for {
		select {
		case st := <-updates:
			last = st
			if st.Version >= want {
				c.log.Info().Str("lane", lane).Int32("version", st.Version).Int32("wanted", want).
					Dur("waited", c.env.now().Sub(start)).Msg("lane reached the version")
				return nil
			}
			if f := migrator.BlockingFailure(info, st, want); f != nil {
				return fmt.Errorf("lane %q cannot reach version %d: recorded permanent failure of %s (fix the migration and deploy again): %s",
					lane, want, f.File, oneLine(st.Error))
			}
			if !logged {
				c.log.Info().Str("lane", lane).Int32("version", st.Version).Int32("wanted", want).Str("state", string(st.State)).
					Str("channel", m.Channel()).Msg("waiting for the lane through LISTEN/NOTIFY")
				logged = true
			}
		case <-wctx.Done():
			if ctx.Err() != nil {
				return fmt.Errorf("wait for lane %q: %w", lane, ctx.Err())
			}
			return timedOut(fmt.Sprintf("is at version %d", last.Version))
		}
	}
}

// ----- new

func newFlags(fs *flag.FlagSet) commandBody {
	lane := fs.String("lane", "", "")
	return func(_ context.Context, c *command, args []string) error {
		switch {
		case *lane == "":
			return usageErrorf("--lane is required")
		case len(args) == 0:
			return usageErrorf("a TITLE is required, such as: lanes new --lane slow add_index")
		}
		path, err := runNew(c, *lane, strings.Join(args, " "))
		if err != nil {
			return err
		}
		fmt.Fprintln(c.env.stdout, path)
		return nil
	}
}

var (
	numberedFile = regexp.MustCompile(`\A(\d+)_.+\.sql\z`)
	notWord      = regexp.MustCompile(`[^a-z0-9]+`)
)

// newFileTemplate is the content of a new migration file; %s is its name, %s its lane.
const newFileTemplate = `-- %s (lane %s)
--
-- Write the migration above the separator. It runs in one transaction together with the
-- lane's version bump, and it is a Go text/template like every tern migration.
-- For statements that cannot run in a transaction, such as CREATE INDEX CONCURRENTLY, add
-- the line "---- tern: disable-tx ----" (on a line of its own, without the leading "-- ").

---- create above / drop below ----

-- Undo the migration here (tern's down migration; lanes itself only migrates up).
`

// runNew creates the next numbered migration file of the lane and returns its path.
func runNew(c *command, lane, title string) (string, error) {
	if c.set.migrations == "" {
		return "", usageErrorf("new needs a migrations folder: set --migrations or LANES_MIGRATIONS")
	}
	if st, err := os.Stat(c.set.migrations); err != nil {
		return "", fmt.Errorf("migrations folder (--migrations or LANES_MIGRATIONS): %w", err)
	} else if !st.IsDir() {
		return "", fmt.Errorf("migrations folder (--migrations or LANES_MIGRATIONS) %s is not a folder", c.set.migrations)
	}
	decls, err := migrator.ParseLaneDecls(c.set.lanes)
	if err != nil {
		return "", usageErrorf("invalid lanes (--lanes or LANES_LANES): %w", err)
	}
	if len(decls) == 0 {
		decls = migrator.DefaultLaneDecls
	}
	if !slices.ContainsFunc(decls, func(d migrator.LaneDecl) bool { return d.Name == lane }) {
		var names []string
		for _, d := range decls {
			names = append(names, d.Name)
		}
		return "", usageErrorf("unknown lane %q (lanes: %s); declare it with --lanes", lane, strings.Join(names, ", "))
	}
	slug := strings.Trim(notWord.ReplaceAllString(strings.ToLower(title), "_"), "_")
	if slug == "" {
		return "", usageErrorf("title %q has no letters or digits", title)
	}
	dir := filepath.Join(c.set.migrations, lane)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create lane folder: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("read lane folder: %w", err)
	}
	last, width := 0, 3 // the width of the highest-numbered file; 3 digits for the first one
	for _, e := range entries {
		m := numberedFile.FindStringSubmatch(e.Name())
		if e.IsDir() || m == nil {
			continue
		}
		n, err := strconv.Atoi(m[1])
		if err != nil {
			continue
		}
		if n > last {
			last, width = n, len(m[1])
		}
	}
	name := fmt.Sprintf("%0*d_%s.sql", width, last+1, slug)
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return "", fmt.Errorf("%s already exists", path)
		}
		return "", fmt.Errorf("create migration file: %w", err)
	}
	if _, err := fmt.Fprintf(f, newFileTemplate, name, lane); err != nil {
		f.Close()
		return "", fmt.Errorf("write migration file: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("write migration file: %w", err)
	}
	c.log.Info().Str("lane", lane).Str("file", name).Msg("created migration file: write its SQL above the separator")
	return path, nil
}
