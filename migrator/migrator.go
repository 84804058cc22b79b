package migrator

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/internal/backoff"
	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/pgconnect"
	"github.com/multilanes/lanes/internal/session"
	"github.com/multilanes/lanes/internal/wire"
)

// DefaultChannel is the channel a lane's completion is announced on.
const DefaultChannel = "lanes_done"

// DefaultHistoryTable is the table recording every applied or failed migration.
const DefaultHistoryTable = "lanes_history"

// Config tunes a Migrator. The zero value is valid: every field has a default.
type Config struct {
	// HistoryTable records each applied migration and each failed attempt, for all lanes.
	// Optionally schema-qualified. Default: DefaultHistoryTable.
	HistoryTable string
	// Channel is the NOTIFY channel. Default: DefaultChannel.
	Channel string
	// LockPollInterval is how often Migrate retries a lane lock held by another session
	// (pg_try_advisory_lock, ±20 % jitter), re-reading the lane's version in between so it
	// returns as soon as the holder has finished. Default: 200ms.
	LockPollInterval time.Duration
	// Logger receives one line per applied migration and warnings. Default: no logging.
	Logger zerolog.Logger
	// Now returns the time recorded in the history table. Default: time.Now.
	Now func() time.Time
	// AllowDrift lets Migrate apply pending migrations although applied files have changed
	// since they were applied (their checksum in the history table differs). Default: false,
	// Migrate returns a *DriftError naming the files.
	AllowDrift bool
	// RetryMin and RetryMax bound the fleet's retry schedule of a lane whose migration fails
	// with a transient error (lock timeout, serialization failure, deadlock): after the n-th
	// such failure in a row TryMigrate, on every replica, returns a *RetryLaterError until
	// RetryMin × 2^(n-1) (at most RetryMax) has passed; the schedule is stored with the lane, so
	// adding replicas does not add attempts. Migrate (an operator's) ignores it. Defaults: 1s
	// and 1m.
	RetryMin, RetryMax time.Duration
	// Batch tunes batched migrations (see BatchConfig for the defaults).
	Batch BatchConfig
	// BeforeConnect, when set, is called with a copy of the connection configuration before
	// each connection the Migrator opens, and each one a Runtime (package app) built on it
	// opens: it may change the copy, for example set Password to a fresh IAM authentication
	// token of a managed database (RDS, Cloud SQL), or return an error to refuse the attempt.
	// It must be safe for concurrent use.
	BeforeConnect func(ctx context.Context, cc *pgx.ConnConfig) error
	// TransactionPooler says that the connection configuration given to New leads through a
	// pooler in transaction or statement mode (PgBouncer's pool_mode = transaction), where a
	// server session is shared by many clients: queries then use pgx.QueryExecModeExec (no
	// prepared statements kept on a server connection), and, unless Direct is set, a lane's
	// lock is a timed lease (see LeaseTTL) rather than a session advisory lock. Default false;
	// Migrator.CheckSessions tells whether it is so.
	TransactionPooler bool
	// Direct, when set, is a connection configuration that reaches the server with a session of
	// its own (the server itself, or a session-mode pool) for a Migrator whose main connection
	// configuration leads through a transaction pooler: lanes are applied on it (the lane's
	// session lock and its migrations share that session), and a Runtime (package app) listens
	// on it. Everything else (status reads, version reads, hints) goes through the main
	// configuration. It is prepared like the main one, and BeforeConnect runs for it too.
	// Default nil.
	Direct *pgx.ConnConfig
	// LeaseTTL is how long a timed lease (through a transaction pooler without Direct) lives
	// unless renewed; the applier renews it every LeaseTTL/3, and another replica may take the
	// lane over once it has expired. It bounds how long a killed or silenced applier keeps the
	// lane. Default: 3s.
	LeaseTTL time.Duration
	// SilenceBound bounds how long an applier holding a lane's session lock (a direct
	// connection, or Direct) may go silent: its lease carries a heartbeat, renewed every
	// SilenceBound/3 on a connection of its own, that expires SilenceBound after the last
	// renewal. A replica waiting for the lane that finds the heartbeat expired while the
	// holder's session still holds the lock ends that session (pg_terminate_backend: the same
	// role, or pg_signal_backend) and takes the lane over; the holder's transaction rolls back
	// and the lease's epoch moves on, so a late commit of a healed applier is refused. An
	// applier that cannot renew before its heartbeat expires stops its run (ErrLeaseLost), as
	// with a timed lease. It is what ends an applier cut off behind a middlebox that keeps
	// both sockets open (no TCP keepalive nor client_connection_check_interval notices that);
	// a healthy applier's long statement is never ended, its heartbeat being renewed
	// meanwhile. When only the applying connection goes silent while the heartbeat's still
	// flows (a middlebox that lost one connection's state), the renewer sees it: the client
	// has waited for an answer, and the server's session has sat idle, both for longer than
	// SilenceBound; it then ends that session itself (the lane is free at once for another
	// replica) and stops the run. Default: 10s.
	SilenceBound time.Duration
}

// Migrator applies lanes of migrations to one database. Each lane has its own version table
// and its own advisory lock, so lanes never wait for each other's locks; within a lane only one
// session applies migrations at a time.
//
// A Migrator holds no connection between calls and is safe for concurrent use: each Migrate
// call opens its own dedicated connection.
type Migrator struct {
	connConfig *pgx.ConnConfig
	lanes      []*loadedLane
	byName     map[string]*loadedLane
	history    tableName
	cfg        Config
	host       string
	pid        int32
	appName    string
	status     statusQuery
	sideSeen   atomic.Bool // the progress and control tables were seen to exist, with the retry schedule
	leaseSeen  atomic.Bool // the lease table was seen to exist
	direct     *pgx.ConnConfig
	userSet    []string // runtime parameters of the connection configuration, lower-cased

	warnOld, warnSet sync.Once   // each said once per Migrator (see noDeadClientCheck)
	warnSilent       sync.Once   // a silent holder this role may not end (see endSilent)
	setFailed        atomic.Bool // the server refused the session settings once

}

// New loads and validates every lane (names, numbering, templates, UTF-8) before touching the
// database; it returns a *LoadError for the first problem. Lanes are applied in the order
// given, and blocking lanes must come before background ones. connConfig is copied and prepared
// as session.Prepare does: application_name lanes/<host>/<pid> when unset, and the session
// settings the server supports set after connecting. On a server without
// client_connection_check_interval (PostgreSQL 13) the Logger says once what that costs.
func New(connConfig *pgx.ConnConfig, lanes []Lane, cfg Config) (*Migrator, error) {
	if connConfig == nil {
		return nil, errors.New("migrator: nil connection config")
	}
	if len(lanes) == 0 {
		return nil, errors.New("migrator: no lanes")
	}
	if cfg.HistoryTable == "" {
		cfg.HistoryTable = DefaultHistoryTable
	}
	if cfg.Channel == "" {
		cfg.Channel = DefaultChannel
	}
	if len(cfg.Channel) > 63 {
		return nil, fmt.Errorf("migrator: channel %q is longer than 63 bytes", cfg.Channel)
	}
	if cfg.LockPollInterval <= 0 {
		cfg.LockPollInterval = 200 * time.Millisecond
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = time.Second
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(time.Minute, cfg.RetryMin)
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = 3 * time.Second
	}
	if cfg.SilenceBound <= 0 {
		cfg.SilenceBound = 10 * time.Second
	}
	cfg.Batch.setDefaults()
	history, err := parseTableName(cfg.HistoryTable)
	if err != nil {
		return nil, fmt.Errorf("migrator: history table: %w", err)
	}
	m := &Migrator{
		byName:  map[string]*loadedLane{},
		history: history,
		cfg:     cfg,
		pid:     int32(os.Getpid()),
	}
	hooks := session.Hooks{NoDeadClientCheck: m.noDeadClientCheck, SetFailed: m.sessionSetFailed}
	m.connConfig = session.Prepare(connConfig, hooks)
	if cfg.TransactionPooler {
		m.connConfig.DefaultQueryExecMode = pgx.QueryExecModeExec
	}
	if cfg.Direct != nil {
		d := cfg.Direct.Copy()
		if d.RuntimeParams == nil {
			d.RuntimeParams = map[string]string{}
		}
		if d.RuntimeParams["application_name"] == "" {
			d.RuntimeParams["application_name"] = m.connConfig.RuntimeParams["application_name"]
		}
		m.direct = session.Prepare(d, hooks)
	}
	for k := range m.connConfig.RuntimeParams {
		m.userSet = append(m.userSet, strings.ToLower(k))
	}
	m.host, _ = os.Hostname()
	m.appName = m.connConfig.RuntimeParams["application_name"]
	tables := map[string]string{}
	sawBackground := false
	for _, spec := range lanes {
		l, err := loadLane(spec)
		if err != nil {
			return nil, err
		}
		l.index = len(m.lanes)
		if _, dup := m.byName[l.Name]; dup {
			return nil, &LoadError{Lane: l.Name, Err: errors.New("lane listed twice")}
		}
		if other, dup := tables[l.table.String()]; dup {
			return nil, &LoadError{Lane: l.Name, Err: fmt.Errorf("version table %s is also used by lane %q", l.table, other)}
		}
		if l.Mode == Blocking && sawBackground {
			return nil, &LoadError{Lane: l.Name, Err: errors.New("blocking lanes must come before background lanes")}
		}
		sawBackground = sawBackground || l.Mode == Background
		tables[l.table.String()] = l.Name
		m.lanes = append(m.lanes, l)
		m.byName[l.Name] = l
	}
	m.status = newStatusQuery(m)
	return m, nil
}

// LaneInfo describes a loaded lane.
type LaneInfo struct {
	Name         string
	Mode         Mode
	VersionTable string
	Latest       int32        // the highest version known to this binary
	Migrations   []*Migration // in version order; copies, so changing them changes nothing
}

// Lanes returns the lanes in order.
func (m *Migrator) Lanes() []LaneInfo {
	out := make([]LaneInfo, 0, len(m.lanes))
	for _, l := range m.lanes {
		info, _ := m.Lane(l.Name)
		out = append(out, info)
	}
	return out
}

// Lane returns the named lane.
func (m *Migrator) Lane(name string) (LaneInfo, bool) {
	l, ok := m.byName[name]
	if !ok {
		return LaneInfo{}, false
	}
	migrations := make([]*Migration, len(l.migrations))
	for i, mig := range l.migrations {
		c := *mig // a copy: what the caller changes never reaches what Migrate runs
		migrations[i] = &c
	}
	return LaneInfo{Name: l.Name, Mode: l.Mode, VersionTable: l.table.String(), Latest: l.latest(), Migrations: migrations}, true
}

// Channel returns the NOTIFY channel.
func (m *Migrator) Channel() string { return m.cfg.Channel }

// ConnConfig returns a copy of the connection configuration the Migrator uses.
func (m *Migrator) ConnConfig() *pgx.ConnConfig { return m.connConfig.Copy() }

// sessionConnConfig returns a copy of the connection configuration that reaches the server with
// a session of its own, for a listener: Config.Direct when set, else the main one.
func (m *Migrator) sessionConnConfig() *pgx.ConnConfig {
	if m.direct != nil {
		return m.direct.Copy()
	}
	return m.connConfig.Copy()
}

// timedLease reports whether a lane's lock is a timed lease: through a transaction pooler
// without a direct connection.
func (m *Migrator) timedLease() bool { return m.cfg.TransactionPooler && m.direct == nil }

// Result tells what a Migrate call did.
type Result struct {
	Lane    string
	From    int32 // the lane's version before the call
	To      int32 // the lane's version after the call
	Latest  int32 // the highest version known to this binary
	Applied int   // migrations applied by this call
	Ahead   bool  // the database is at a version this binary does not know (a newer deploy)
}

// Migrate applies the pending migrations of the lane, waiting for the lane's lock while another
// session holds it. It first resolves the lanes' version tables for its connection to
// schema-qualified names (one query; two lanes resolving to one table are an error, and nothing
// runs) and reads the lane's version from that table without any lock, returning at once when
// nothing is pending; the lock (keyed by the resolved name), the creation of a missing version
// table and every write then use the same table. A missing version table while the history table
// records migrations of the lane as applied is an error naming both tables. While waiting for
// the lock it re-reads the version, so it also returns as soon as the holder has applied
// everything. A database ahead of this binary is not an error:
// Result.Ahead is set and a warning logged.
//
// A run that loses its lane (a timed lease that expired and was taken over, see
// Config.LeaseTTL) has its work rolled back and waits for the lane again.
//
// Each migration and its version bump commit in one transaction (disable-tx migrations run
// outside it, then a short transaction records the version). When a background lane's
// migration commits, or the last migration of a blocking lane, the same transaction sends
// NOTIFY on the Migrator's channel. A failure returns a *MigrationError, is recorded in the
// history table and announced; nothing of a transactional migration stays applied.
func (m *Migrator) Migrate(ctx context.Context, lane string) (Result, error) {
	applied := 0
	for {
		res, err := m.run(ctx, lane, true)
		applied += res.Applied
		res.Applied = applied
		if !errors.Is(err, ErrLeaseLost) || ctx.Err() != nil {
			return res, err
		}
		// Another session took the lane over from this one (its timed lease expired): wait for
		// that session as for any holder.
		m.cfg.Logger.Warn().Err(err).Str("lane", lane).Msg("lane lease lost to another session; waiting for the lane again")
	}
}

// TryMigrate is Migrate for replicas that retry on their own schedule: it returns ErrLocked at
// once when another session holds the lane's lock, and it does not re-run a migration whose last
// attempt failed with a permanent error while the file is unchanged (same checksum): it returns
// a *MigrationError wrapping ErrFailedBefore instead. Migrate, run by an operator, re-runs it.
func (m *Migrator) TryMigrate(ctx context.Context, lane string) (Result, error) {
	return m.run(ctx, lane, false)
}

func (m *Migrator) run(ctx context.Context, name string, wait bool) (Result, error) {
	if _, ok := m.byName[name]; !ok {
		return Result{Lane: name}, fmt.Errorf("lane %q: %w", name, ErrUnknownLane)
	}
	if conn := engine.Conn(ctx); conn != nil {
		return m.runOn(ctx, conn, name, wait)
	}
	conn, err := m.connect(ctx)
	if err != nil {
		return Result{Lane: name}, fmt.Errorf("lane %q: %w", name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return m.runOn(ctx, conn, name, wait)
}

func (m *Migrator) runOn(ctx context.Context, conn *pgx.Conn, name string, wait bool) (res Result, err error) {
	l, ok := m.byName[name]
	if !ok {
		return Result{Lane: name}, fmt.Errorf("lane %q: %w", name, ErrUnknownLane)
	}
	res = Result{Lane: name, Latest: l.latest()}

	// Resolve the lane's version table once for this connection: every read, the creation, the
	// lock and every write below use the same schema-qualified table.
	tables, _, err := m.resolveTables(ctx, conn)
	if err != nil {
		return res, fmt.Errorf("lane %q: %w", name, err)
	}
	resolved := tables[l.index]
	lane := *l
	lane.table = resolved.table
	l = &lane

	done := func(v int32) (Result, error) {
		res.To, res.Ahead = v, v > l.latest()
		if res.Ahead {
			m.cfg.Logger.Warn().Str("lane", name).Int32("version", v).Int32("latest", l.latest()).
				Msg("database is ahead of this binary: a newer deploy applied migrations this binary does not know; treating the lane as done")
		}
		return res, nil
	}
	v, err := readVersion(ctx, conn, l.table)
	if err != nil {
		return res, fmt.Errorf("lane %q: %w", name, err)
	}
	res.From = v
	if v >= l.latest() {
		if wait && !m.cfg.AllowDrift {
			// Migrate (an operator's or a start-up's) also checks a lane that is up to date:
			// applied files renamed or changed since are an error, not "done". TryMigrate, the
			// replicas' background retry, leaves that to Status (AddDrift: state drift).
			if files, err := m.drift(ctx, conn, l, v); err != nil {
				return res, err
			} else if len(files) > 0 {
				return res, &DriftError{Lane: name, Files: files}
			}
		}
		return done(v)
	}

	lock := m.newLaneLock(conn, m.byName[name], resolved)
	l.lock = lock
	// A timed lease lost while applying (it could not be renewed in time and another replica
	// took the lane over) stops this run: its next commit would be refused anyway.
	ctx, stopRun := context.WithCancelCause(ctx)
	defer stopRun(nil)
	lost := func() { stopRun(ErrLeaseLost) }
	trace := traceFrom(ctx)
	var waitStart time.Time  // set once the lock was found held and this call waits
	var lastSilent time.Time // when this call last looked for a silent holder
	for {
		got, err := lock.tryLock(ctx, lost)
		if err != nil {
			return res, fmt.Errorf("lane %q: %w", name, err)
		}
		if got {
			if !waitStart.IsZero() {
				trace.lockWaited(name, waitStart, true)
			}
			break
		}
		if !wait {
			return res, fmt.Errorf("lane %q: %w", name, ErrLocked)
		}
		if waitStart.IsZero() {
			waitStart = time.Now()
		}
		if time.Since(lastSilent) >= silentCheckEvery {
			// A holder cut off behind a middlebox never lets go of the lock by itself.
			lastSilent = time.Now()
			if _, err := m.endSilentHolder(ctx, conn, name); err != nil {
				m.cfg.Logger.Debug().Err(err).Str("lane", name).Msg("look for a silent holder")
			}
		}
		if err := backoff.Sleep(ctx, backoff.Jitter(m.cfg.LockPollInterval)); err != nil {
			trace.lockWaited(name, waitStart, false)
			return res, fmt.Errorf("lane %q: wait for lock: %w", name, err)
		}
		if v, err = readVersion(ctx, conn, l.table); err != nil {
			trace.lockWaited(name, waitStart, false)
			return res, fmt.Errorf("lane %q: %w", name, err)
		} else if v >= l.latest() {
			trace.lockWaited(name, waitStart, false)
			return done(v)
		}
	}
	var failure *event // announced once the lock is released, see recordFailure
	defer func() {
		if err != nil && errors.Is(context.Cause(ctx), ErrLeaseLost) && !errors.Is(err, ErrLeaseLost) {
			err = fmt.Errorf("lane %q: %w", name, ErrLeaseLost)
		}
		if uerr := lock.unlock(ctx); uerr != nil {
			m.cfg.Logger.Warn().Err(uerr).Str("lane", name).Msg("could not release the lane lock; closing the connection releases it")
			_ = conn.Close(ctx)
			if err == nil {
				err = fmt.Errorf("lane %q: %w", name, uerr)
			}
		}
		switch {
		case failure != nil:
			m.announce(ctx, conn, *failure)
		case err != nil && ctx.Err() != nil:
			// Stopped halfway: tell the replicas waiting for this lane that its lock is free,
			// so they need not wait for their next check to take it over.
			m.announce(ctx, conn, event{Lane: name, Version: res.To, State: wire.Released})
		}
	}()

	if err := ensureHistoryTable(ctx, conn, m.history); err != nil {
		return res, fmt.Errorf("lane %q: %w", name, err)
	}
	if err := ensureVersionTable(ctx, conn, name, l.table, m.history); err != nil {
		return res, fmt.Errorf("lane %q: %w", name, err)
	}
	if err := m.ensureSideTables(ctx, conn); err != nil {
		return res, fmt.Errorf("lane %q: %w", name, err)
	}
	if v, err = readVersion(ctx, conn, l.table); err != nil {
		return res, fmt.Errorf("lane %q: %w", name, err)
	}
	res.From = v
	if v >= l.latest() {
		return done(v)
	}
	if v < 0 {
		return res, fmt.Errorf("lane %q: version table %s holds version %d", name, l.table, v)
	}
	ctl, err := m.readControl(ctx, conn, name)
	if err != nil {
		return res, err
	}
	if ctl.paused {
		return res, fmt.Errorf("lane %q: %w", name, ErrPaused)
	}
	if !wait && ctl.next != nil && ctl.next.After(ctl.now) {
		return res, &RetryLaterError{Lane: name, Attempts: ctl.attempts, At: *ctl.next, In: ctl.next.Sub(ctl.now)}
	}
	if !wait {
		if err := m.failedBefore(ctx, conn, l, l.migrations[v]); err != nil {
			return res, err
		}
	}
	if !m.cfg.AllowDrift {
		files, err := m.drift(ctx, conn, l, v)
		if err != nil {
			return res, err
		}
		if len(files) > 0 {
			return res, &DriftError{Lane: name, Files: files}
		}
	}
	for ; v < l.latest(); v++ {
		mig := l.migrations[v]
		start, began := m.cfg.Now(), time.Now()
		if err := m.apply(ctx, conn, l, mig, start); err != nil {
			if errors.Is(err, ErrPaused) || errors.Is(err, ErrLeaseLost) || errors.Is(context.Cause(ctx), ErrLeaseLost) {
				res.To = v
				return res, err
			}
			failure = m.recordFailure(ctx, conn, l, mig, start, err)
			if IsTransient(err) && ctx.Err() == nil && !conn.IsClosed() {
				after := ctl.attempts
				if res.Applied > 0 {
					after = 0
				}
				m.scheduleRetry(ctx, conn, name, after)
			}
			res.To = v
			trace.migrationDone(name, mig, began, err)
			return res, err
		}
		res.Applied++
		if res.Applied == 1 && ctl.attempts > 0 {
			m.clearSchedule(ctx, conn, name)
		}
		trace.migrationDone(name, mig, began, nil)
		m.cfg.Logger.Info().Str("lane", name).Int32("version", mig.Version).Str("file", mig.Name).
			Float64("duration_s", m.cfg.Now().Sub(start).Seconds()).Msgf("OK   %s (%s)", mig.Name, m.cfg.Now().Sub(start).Round(10*time.Microsecond))
	}
	return done(v)
}

// silentCheckEvery is how often Migrate, waiting for a lane's lock, looks for a silent holder
// (see endSilentHolder).
const silentCheckEvery = time.Second

func init() {
	engine.Connect = func(ctx context.Context, m any) (*pgx.Conn, error) { return m.(*Migrator).connect(ctx) }
	engine.BeforeConnect = func(m any) func(context.Context, *pgx.ConnConfig) error {
		return m.(*Migrator).cfg.BeforeConnect
	}
	engine.ApplierLockKey = func(m any, lane string) (int64, error) { return m.(*Migrator).applierLockKey(lane) }
	engine.LaneFree = func(ctx context.Context, m any, q engine.Querier, lane string) (bool, error) {
		return m.(*Migrator).laneFree(ctx, q, lane)
	}
	engine.SessionConnConfig = func(m any) *pgx.ConnConfig { return m.(*Migrator).sessionConnConfig() }
}

// connect opens a dedicated connection for applying migrations (through Config.Direct when
// set), with the runtime parameters of session.Prepare, after Config.BeforeConnect. Cancelling
// the context of a call on it first asks the server to cancel the running statement (so a
// transaction rolls back and the lane lock is released cleanly) and breaks the connection only
// if the server has not answered within 5 seconds. Behind a pooler (found when connecting: the
// server session is not the one the pooler announced) it breaks the connection after a second
// instead: a cancel request through PgBouncer 1.18 can make it exit (see session.CancelHandler).
func (m *Migrator) connect(ctx context.Context) (*pgx.Conn, error) {
	if m.direct != nil {
		return m.connectWith(ctx, m.direct, false)
	}
	return m.connectWith(ctx, m.connConfig, m.cfg.TransactionPooler)
}

// connectWith opens a connection with cfg as connect does; pooled: never send a cancel request.
func (m *Migrator) connectWith(ctx context.Context, cfg *pgx.ConnConfig, pooled bool) (*pgx.Conn, error) {
	cfg = cfg.Copy()
	watchConnections(cfg)
	cfg.BuildContextWatcherHandler = func(pgConn *pgconn.PgConn) ctxwatch.Handler { return session.NewCancelHandler(pgConn, pooled) }
	if m.cfg.BeforeConnect != nil {
		if err := m.cfg.BeforeConnect(ctx, cfg); err != nil {
			return nil, fmt.Errorf("connect: before connect: %w", err)
		}
	}
	conn, err := pgconnect.Connect(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return conn, nil
}

// Version reads one lane's applied version without any lock (one short statement); a missing
// version table is version 0.
func (m *Migrator) Version(ctx context.Context, q Querier, lane string) (int32, error) {
	l, ok := m.byName[lane]
	if !ok {
		return 0, fmt.Errorf("lane %q: %w", lane, ErrUnknownLane)
	}
	return readVersion(ctx, q, l.table)
}

// readVersion reads a lane's version without any lock; a missing version table is version 0.
func readVersion(ctx context.Context, conn Querier, t tableName) (int32, error) {
	var v *int32
	err := conn.QueryRow(ctx, "select max(version) from "+t.Quoted()).Scan(&v)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // undefined_table
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read version table %s: %w", t, err)
	}
	if v == nil {
		return 0, nil
	}
	return *v, nil
}
