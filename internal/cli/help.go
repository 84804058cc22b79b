package cli

import (
	"flag"
	"fmt"
	"io"
	"runtime/debug"
	"strings"
	"text/tabwriter"
)

// commandSpec describes one command: how it is invoked, what it does, and the function that
// defines its flags (with their usage strings, from which help is generated) and returns its
// body.
type commandSpec struct {
	name     string
	synopsis string // the arguments after the command's name
	summary  string // one line for the command list
	details  string // paragraphs for the command's own --help; may be empty
	define   func(fs *flag.FlagSet) commandBody
}

// commandList is every command, in the order help lists them.
var commandList = []commandSpec{
	{name: "migrate", synopsis: "[--lane NAME]... [--allow-drift] [--dry-run] [--timeout D]",
		summary: "apply the pending migrations of every lane (or of the named lanes), in lane order, in the foreground",
		details: "Each lane is applied under its own lock, one transaction per migration; blocking\nand background lanes alike. Exits 1 when a migration fails (it is recorded in the\nhistory table and nothing of it stays applied). While no usable database answers\n(a failover, a restart, a read-only server) it retries with backoff, finding the\nprimary through the URL (several hosts and target_session_attrs=read-write), and\nexits 4 after --timeout; a migration cut off runs again from its start.",
		define:  migrateFlags},
	{name: "status", synopsis: "[--json | --watch] [--allow-drift] [--timeout D]",
		summary: "print each lane's version, latest version, state, lock, last error and drift",
		details: "Exits 0 even when lanes are pending or failed; 4 when no usable database answers\nwithin --timeout. --json prints {\"lanes\":[...]}.",
		define:  statusFlags},
	{name: "wait", synopsis: "--lane NAME [--version N] [--timeout D]",
		summary: "block, listening on the NOTIFY channel, until a lane reaches a version; applies nothing",
		details: "Exits 0 when the lane has the version, 1 on a recorded permanent failure of a\nmigration the wait depends on, 3 when --timeout expires.",
		define:  waitFlags},
	{name: "pause", synopsis: "--lane NAME",
		summary: "pause a background lane: its applier stops at the next batch boundary, no replica starts it",
		details: "Stored in the database (lanes_control): survives restarts, takeovers and deploys.\nAnnounced on the NOTIFY channel. Readiness does not change. Blocking lanes cannot\nbe paused.",
		define:  controlFlags("pause")},
	{name: "resume", synopsis: "--lane NAME",
		summary: "resume a paused lane: a replica takes it up after its last committed batch",
		define:  controlFlags("resume")},
	{name: "retry", synopsis: "--lane NAME",
		summary: "clear the lane's recorded permanent failure so replicas try the migration again",
		details: "For a data problem fixed by hand: the file is unchanged, the failure stays in\nlanes_history, and replicas retry the migration (a batched one after its last\ncommitted batch).",
		define:  controlFlags("retry")},
	{name: "history", synopsis: "[--lane NAME] [--limit N] [--json]",
		summary: "list the applied, failed and forced migrations recorded in lanes_history, newest first",
		details: "Each row: lane, version, file, result (applied, failed, forced), start, duration,\nthe replica that ran it (application name, else host/pid), checksum and error.",
		define:  historyFlags},
	{name: "force", synopsis: "--lane NAME --version N",
		summary: "set a lane's version after a manual repair, recorded in lanes_history as forced",
		details: "Runs nothing of any migration. Refused (exit 1) while another session holds the\nlane's lock. A recorded failure stops being the lane's last attempt, so replicas\ntry the next migration again. A lower version makes the migrations above it run\nagain.",
		define:  forceFlags},
	{name: "validate", synopsis: "[--strict]",
		summary: "load and check every lane without a database (for CI), and print the lint warnings",
		details: "Exits 1 when a lane does not load (numbering, names, templates, directives), and\nwith --strict also when lint warns. Needs --migrations; never connects.",
		define:  validateFlags},
	{name: "lint", synopsis: "",
		summary: "warn, naming file and line, on risky statements; exit 1 when there is any",
		details: "Rules: create index without concurrently on an existing table in a blocking lane;\na disable-tx create index concurrently without drop index concurrently if exists\nbefore it; create index concurrently in a transactional file; an ACCESS EXCLUSIVE\nlock (alter/drop/truncate/lock table, ...) in a blocking lane without lock_timeout\n(in the file, or the connection's options); SET in a file (reset after each\nmigration). Never connects.",
		define:  lintFlags},
	{name: "new", synopsis: "--lane NAME TITLE",
		summary: "create the lane's next numbered file NNN_title.sql (needs --migrations) and print its path",
		define:  newFlags},
	{name: "serve", synopsis: "[--addr ADDR] [--allow-drift]",
		summary: "run one app replica with its HTTP endpoints until SIGINT/SIGTERM",
		details: "HTTP first (GET /: a live page of every lane, updated through GET /events;\nGET /healthz; GET /readyz: 503 until the blocking lanes are applied, then 200;\nGET /lanes: the status JSON; GET /metrics: Prometheus metrics), then the\nblocking lanes, then the background lanes on whichever replica wins each\nlane's lock.",
		define:  serveFlags},
	{name: "demo", synopsis: "",
		summary: "play the demo: three replicas, a fast lane and a slow lane whose completion reaches every replica",
		details: "Always the embedded demo migrations, in a database it creates and drops (on\nDATABASE_URL's server, else the local server, else a throwaway cluster it starts\nand stops).",
		define:  demoFlags},
}

// lookupCommand returns the named command.
func lookupCommand(name string) (commandSpec, bool) {
	for _, c := range commandList {
		if c.name == name {
			return c, true
		}
	}
	return commandSpec{}, false
}

const helpIntro = `lanes applies PostgreSQL migrations in lanes: blocking lanes are applied before a replica
is ready, background lanes after it, by one replica, and every replica learns of a lane's
completion through LISTEN/NOTIFY.

Usage:
  lanes [global flags] COMMAND [command flags]
  lanes COMMAND --help       the command's own flags
  lanes --version            the version of this binary
`

const helpTuning = `Tuning for serve and wait (environment variables only; unset or 0: the default; values are Go
durations such as 500ms, 2s or 1m):
  LANES_PING_INTERVAL      how often the LISTEN connection is checked (a ping): a dead or
                           half-open connection is replaced (default 5s); the one replica
                           designated to take a background lane over checks the lane's lock
                           every second
  LANES_TAKEOVER_INTERVAL  serve: the longest the replica designated to take a background lane
                           over goes without trying the lane's lock itself, a backstop to its
                           check (default 1m, +-20 %; other waiting replicas: that times their
                           number)
  LANES_KEEP_LISTENING     serve: 1 keeps the LISTEN connection open once every lane is done
                           (default 0: closed between deploys, opened again when needed)
  LANES_POLL_INTERVAL      how often the lanes are re-read while LISTEN is unavailable (a hot
                           standby, a pooler in transaction mode) (default 5s)
  LANES_RELISTEN_INTERVAL  how often LISTEN is tried again while polling (default 1m)
  LANES_ADDR               serve: the listen address when --addr is not given (default :8080)
  LANES_SILENCE_BOUND      serve and migrate: how long a lane's applier may go without renewing
                           its heartbeat (every third of it) before a waiting replica ends its
                           session and takes the lane over: an applier cut off behind a
                           middlebox that keeps its sockets open (default 10s)

Poolers, for every command that connects:
  LANES_DIRECT_URL         a URL reaching the server without a transaction pooler: lanes are
                           applied (session lock) and notifications heard on it; everything
                           else uses DATABASE_URL (default: none)
  LANES_POOL_MODE          transaction or session: how DATABASE_URL is pooled; transaction
                           means timed lane leases, no prepared statements and polling unless
                           LANES_DIRECT_URL is set (default: detected at start)

Batched migrations, for serve and migrate (a ---- lanes: batch ... ---- file):
  LANES_BATCH_TARGET       the duration a batch should take; the batch size adapts (default 200ms)
  LANES_BATCH_PAUSE        a sleep between batches (default 0)
  LANES_BATCH_NICE_RATIO   also sleep this many times the last batch's duration (default 0)
  LANES_MAX_REPLICATION_LAG  hold batches back while a standby's replay lag exceeds it
                           (default 30s; off disables)
  LANES_BATCH_STATEMENT_TIMEOUT, LANES_BATCH_LOCK_TIMEOUT  per-batch timeouts (defaults: the
                           larger of 50 targets and 10s; the larger of the target and 100ms)
`

const helpExitCodes = `Exit codes:
  0  success (wait: the lane reached the version; serve: stopped by SIGINT or SIGTERM)
  1  a migration failed (or changed files: drift), bad configuration, or (wait) a recorded
     permanent failure of a migration the wait depends on
  2  usage error: unknown command or flag, missing argument, unknown lane
  3  wait: --timeout expired before the lane reached the version
  4  no usable database: credentials refused or no such database, or (after retrying with
     backoff for --timeout) no server answered, connections kept being lost, or the server
     stayed read-only
`

// writeUsage prints the top-level help: the commands, the global flags (from their flag set),
// the tuning variables and the exit codes.
func writeUsage(w io.Writer) {
	fmt.Fprint(w, helpIntro)
	fmt.Fprintln(w, "\nCommands:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, c := range commandList {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.summary)
	}
	_ = tw.Flush()
	fmt.Fprintln(w, "\nGlobal flags (each also read from an environment variable; the flag wins; they may also\nfollow the command):")
	var g globals
	fs := flag.NewFlagSet("lanes", flag.ContinueOnError)
	g.register(fs)
	writeFlags(w, fs)
	fmt.Fprintln(w)
	fmt.Fprint(w, helpTuning)
	fmt.Fprintln(w, "\nResults go to stdout; logs and errors to stderr. Passwords are never printed: a server is\nshown as host, port, user and database.")
	fmt.Fprintln(w)
	fmt.Fprint(w, helpExitCodes)
}

// writeCommandUsage prints one command's help: its synopsis, what it does and its own flags,
// generated from the flag set the command defines.
func writeCommandUsage(w io.Writer, c commandSpec) {
	fmt.Fprintf(w, "Usage: lanes %s %s\n\n%s.\n", c.name, c.synopsis, upperFirst(c.summary))
	if c.details != "" {
		fmt.Fprintf(w, "\n%s\n", c.details)
	}
	fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
	c.define(fs)
	if hasFlags(fs) {
		fmt.Fprintln(w, "\nFlags:")
		writeFlags(w, fs)
	}
	fmt.Fprintln(w, "\nGlobal flags (--database-url, --migrations, --lanes, --channel, --log-format) and the\nexit codes: lanes --help.")
}

func hasFlags(fs *flag.FlagSet) bool {
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	return n > 0
}

// writeFlags prints every flag of fs with its usage string. A usage string may name the flag's
// value in back quotes, as flag.UnquoteUsage reads it.
func writeFlags(w io.Writer, fs *flag.FlagSet) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fs.VisitAll(func(f *flag.Flag) {
		value, usage := flag.UnquoteUsage(f)
		if value != "" {
			value = " " + strings.ToUpper(value)
		}
		lines := strings.Split(usage, "\n")
		fmt.Fprintf(tw, "  --%s%s\t%s\n", f.Name, value, lines[0])
		for _, l := range lines[1:] {
			fmt.Fprintf(tw, "  \t%s\n", l)
		}
	})
	_ = tw.Flush()
}

func upperFirst(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// version returns the module version and VCS revision of this binary from its build info:
// "v1.2.3", or "(devel) commit abc1234 (modified)" for a binary built from a checkout.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown (no build information)"
	}
	v := bi.Main.Version
	if v == "" {
		v = "(devel)"
	}
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				modified = " (modified)"
			}
		}
	}
	if rev != "" && !strings.Contains(v, rev[:min(12, len(rev))]) {
		v += " commit " + rev[:min(12, len(rev))] + modified
	}
	return v + " " + bi.GoVersion
}
