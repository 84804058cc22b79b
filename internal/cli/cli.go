// Package cli is the `lanes` command line: Main and the command dispatch (this file), global
// flags and environment variables (flags.go), help generated from the flag sets (help.go), and
// one file per command (migrate.go, status.go, wait.go, new.go, serve.go, demo.go).
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
	"net"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/internal/connerr"
	"github.com/multilanes/lanes/internal/pgconnect"
	"github.com/multilanes/lanes/migrator"
)

// Exit codes returned by Main.
const (
	// ExitOK: the command succeeded (wait: the lane reached the version; serve: stopped by
	// SIGINT or SIGTERM).
	ExitOK = 0
	// ExitError: a failed migration (or drift), bad configuration, or for wait a recorded
	// permanent failure of a migration the wait depends on.
	ExitError = 1
	// ExitUsage: unknown command or flag, missing or malformed argument, unknown lane.
	ExitUsage = 2
	// ExitTimeout: wait's --timeout expired before the lane reached the version.
	ExitTimeout = 3
	// ExitNoDatabase: no usable database: the server refused the credentials or the database
	// does not exist, or (after retrying with backoff for --timeout) no server answered, the
	// connection kept being lost, or the server stayed read-only.
	ExitNoDatabase = 4
)

// defaultConnectTimeout bounds each connection attempt when the URL sets no connect_timeout.
const defaultConnectTimeout = 10 * time.Second

// Main runs the lanes command line with args (the arguments after the program name) and returns
// the process exit code (ExitOK, ExitError, ExitUsage, ExitTimeout or ExitNoDatabase). Environment variables are
// read from the process. Cancelling ctx stops the running command: serve then shuts down
// gracefully and returns ExitOK. built holds what a binary of the user's own adds (the public
// entry point is lanescli.Main); the zero value is the stock binary.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer, built Built) int {
	return run(ctx, args, &env{
		stdout:   stdout,
		stderr:   stderr,
		getenv:   os.Getenv,
		terminal: isTerminal(stderr),
		now:      time.Now,
		demo:     defaultDemoOptions(),
		built:    built,
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
	built          Built          // lanes and Go migrations built into the binary
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

// logTimeFormat is RFC 3339 with milliseconds: the demo's story is told in milliseconds.
const logTimeFormat = "2006-01-02T15:04:05.000Z07:00"

// newLogger returns the zerolog logger of a run, at info level, writing to w. Each line's
// "time" comes from now (set by a hook rather than zerolog's global time format and clock).
func newLogger(format string, w io.Writer, terminal bool, now func() time.Time) zerolog.Logger {
	w = zerolog.SyncWriter(w)
	if format == "console" {
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: "15:04:05.000", NoColor: !terminal, FormatPrepare: durationsWithUnits}
	}
	stamp := zerolog.HookFunc(func(e *zerolog.Event, _ zerolog.Level, _ string) {
		e.Str(zerolog.TimestampFieldName, now().UTC().Format(logTimeFormat))
	})
	return zerolog.New(w).Level(zerolog.InfoLevel).Hook(stamp)
}

// durationsWithUnits rewrites, for the console, the fields that JSON logs carry as seconds
// (named with the suffix "_s", such as "duration_s": 0.0123) as durations with their unit
// ("duration=12.3ms").
func durationsWithUnits(fields map[string]any) error {
	for k, v := range fields {
		name, ok := strings.CutSuffix(k, "_s")
		if !ok || name == "" {
			continue
		}
		var secs float64
		switch n := v.(type) {
		case json.Number:
			f, err := n.Float64()
			if err != nil {
				continue
			}
			secs = f
		case float64:
			secs = n
		default:
			continue
		}
		delete(fields, k)
		fields[name] = roundDuration(time.Duration(secs * float64(time.Second))).String()
	}
	return nil
}

// roundDuration keeps three significant digits or so: 12.345678ms is shown as 12.35ms.
func roundDuration(d time.Duration) time.Duration {
	switch {
	case d >= time.Minute:
		return d.Round(time.Second)
	case d >= time.Second:
		return d.Round(time.Millisecond)
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	default:
		return d.Round(time.Microsecond / 10)
	}
}

// command is one command being run: its environment, settings and logger.
type command struct {
	name       string
	env        *env
	set        settings
	log        zerolog.Logger
	allowDrift bool // --allow-drift of migrate, serve and status
	pooled     bool // a transaction pooler was detected (see forPooler)
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

// migrator loads the lanes and returns a Migrator for the configured database. It does not
// connect.
func (c *command) migrator() (*migrator.Migrator, error) {
	cfg, err := c.connConfig()
	if err != nil {
		return nil, err
	}
	lanes, err := c.laneSpecs()
	if err != nil {
		return nil, err
	}
	bc, err := c.batchConfig()
	if err != nil {
		return nil, err
	}
	mode, err := c.poolMode()
	if err != nil {
		return nil, err
	}
	direct, err := c.directConnConfig()
	if err != nil {
		return nil, err
	}
	var bound time.Duration
	if s := strings.TrimSpace(c.env.getenv("LANES_SILENCE_BOUND")); s != "" {
		if bound, err = time.ParseDuration(s); err != nil || bound < 0 {
			return nil, usageErrorf("invalid LANES_SILENCE_BOUND=%q: want a duration such as 10s", s)
		}
	}
	m, err := migrator.New(cfg, lanes, migrator.Config{Channel: c.set.channel, Logger: c.log, Now: c.env.now, AllowDrift: c.allowDrift, Batch: bc,
		TransactionPooler: c.pooled || mode == "transaction", Direct: direct, SilenceBound: bound})
	if err != nil {
		return nil, fmt.Errorf("load migrations: %w", err)
	}
	return m, nil
}

// connect opens one connection with the Migrator's configuration.
func connect(ctx context.Context, m *migrator.Migrator) (*pgx.Conn, error) {
	cfg := m.ConnConfig()
	conn, err := pgconnect.Connect(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", target(cfg), err)
	}
	return conn, nil
}

// commandBody runs a command with its positional arguments, once its flags are parsed.
type commandBody func(ctx context.Context, c *command, args []string) error

// run is Main with an injectable environment.
func run(ctx context.Context, args []string, e *env) int {
	var g globals
	set := map[string]bool{}
	top := flag.NewFlagSet("lanes", flag.ContinueOnError)
	top.SetOutput(io.Discard)
	g.register(top)
	showVersion := top.Bool("version", false, "")
	if err := top.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			writeUsage(e.stdout)
			return ExitOK
		}
		return usageFail(e, err)
	}
	if *showVersion {
		fmt.Fprintln(e.stdout, "lanes", version())
		return ExitOK
	}
	top.Visit(func(f *flag.Flag) { set[f.Name] = true })
	rest := top.Args()
	if len(rest) == 0 {
		return usageFail(e, errors.New("no command given"))
	}
	name := rest[0]
	if name == "help" {
		if len(rest) > 1 {
			if spec, ok := lookupCommand(rest[1]); ok {
				writeCommandUsage(e.stdout, spec)
				return ExitOK
			}
		}
		writeUsage(e.stdout)
		return ExitOK
	}
	if name == "version" {
		fmt.Fprintln(e.stdout, "lanes", version())
		return ExitOK
	}
	spec, ok := lookupCommand(name)
	if !ok {
		return usageFail(e, fmt.Errorf("unknown command %q", name))
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	g.register(fs)
	body := spec.define(fs)
	positional, err := parseInterspersed(fs, rest[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			writeCommandUsage(e.stdout, spec)
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
	msg := redact(redact(connerr.Compact(err).Error(), s.databaseURL), e.getenv("LANES_DIRECT_URL"))
	if s.logFormat == "json" {
		// Errors go to stderr, even for the demo whose story goes to stdout.
		errLog := newLogger(s.logFormat, e.stderr, e.terminal, e.now)
		errLog.Error().Str("command", name).Int("exit_code", code).Str("error", msg).Msg(name + " failed")
	} else {
		fmt.Fprintf(e.stderr, "lanes %s: %s\n", name, msg)
	}
	if code == ExitUsage {
		fmt.Fprintf(e.stderr, "Run 'lanes %s --help' for usage.\n", name)
	}
	return code
}

// usageFail reports a usage error found before any command ran.
func usageFail(e *env, err error) int {
	fmt.Fprintf(e.stderr, "lanes: %s\nRun 'lanes --help' for usage.\n", redact(err.Error(), ""))
	return ExitUsage
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
