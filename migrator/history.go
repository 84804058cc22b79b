package migrator

import (
	"context"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/wire"
)

// record bumps the lane's version, writes the history row and, when due, notifies: one round
// trip, inside the migration's transaction. The version update only matches the expected
// previous version, so a version table changed behind the lock is detected, not overwritten.
func (m *Migrator) record(ctx context.Context, tx pgx.Tx, l *loadedLane, mig *Migration, start time.Time) error {
	if err := l.lock.fence(ctx, tx); err != nil {
		return m.wrap(mig, statement{}, err)
	}
	b := &pgx.Batch{}
	b.Queue("reset all") // like tern: a migration's SET must not leak into the bookkeeping
	b.Queue("update "+l.table.Quoted()+" set version = $1 where version = $2", mig.Version, mig.Version-1)
	b.Queue("insert into "+m.history.Quoted()+` (lane, version, name, checksum, started_at, finished_at, host, pid, application_name)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9)`, l.Name, mig.Version, mig.Name, mig.Checksum, start, m.cfg.Now(), m.host, m.pid, m.appName)
	last := mig.Version == l.latest()
	if last || l.Mode == Background {
		state := wire.Applied
		if last {
			state = wire.Done
		}
		b.Queue("select pg_notify($1, $2)", m.cfg.Channel, event{Lane: l.Name, Version: mig.Version, State: state, File: mig.Name}.Payload())
	}
	// reset all also reset the session settings set after connecting (they are not startup
	// parameters): set them again, unless the server refused them before.
	if !m.setFailed.Load() {
		restore, err := m.restoreSessionSQL(ctx, tx.Conn().PgConn())
		if err != nil {
			return m.wrap(mig, statement{}, fmt.Errorf("record version: %w", err))
		}
		if restore != "" {
			b.Queue(restore)
		}
	}
	if m.appName != "" {
		// Behind a pooler (PgBouncer sets application_name with SET on its server connection),
		// reset all would blank the session's name in pg_stat_activity for the rest of the run.
		b.Queue("select set_config('application_name', $1, false)", m.appName)
	}
	br := tx.SendBatch(ctx, b)
	_, err := br.Exec()
	var tag pgconn.CommandTag
	if err == nil {
		tag, err = br.Exec()
	}
	if err == nil && tag.RowsAffected() != 1 {
		err = fmt.Errorf("version table %s is no longer at version %d: changed outside the lane lock", l.table, mig.Version-1)
	}
	for i := 2; err == nil && i < b.Len(); i++ {
		_, err = br.Exec()
	}
	if cerr := br.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return m.wrap(mig, statement{}, fmt.Errorf("record version: %w", err))
	}
	return nil
}

// recordFailure writes the failed attempt to the history table, best effort: when the
// connection is gone or the caller stopped, the failure is only returned. It returns the event
// to announce after the lane's lock is released (nil when nothing was recorded): announced
// earlier, replicas re-reading the lane would still see it locked and could not tell a failed
// lane from a running one.
func (m *Migrator) recordFailure(ctx context.Context, conn *pgx.Conn, l *loadedLane, mig *Migration, start time.Time, cause error) *event {
	log := m.cfg.Logger.Error()
	if ctx.Err() != nil || IsTransient(cause) {
		log = m.cfg.Logger.Warn() // a stop, a lost connection, a failover: it runs again
	}
	log = log.Err(cause).Str("lane", l.Name).Int32("version", mig.Version).Str("file", mig.Name)
	if ctx.Err() != nil || conn.IsClosed() {
		log.Msg("migration stopped")
		return nil
	}
	log.Bool("transient", IsTransient(cause)).Msg("migration failed")
	var me *MigrationError
	errors.As(cause, &me)
	msg := truncate(cause.Error(), maxErrorBytes)
	var sqlstate, stmt *string
	if me != nil {
		if me.SQLState != "" {
			sqlstate = &me.SQLState
		}
		if me.Statement != "" {
			ex := excerpt(me.Statement, me.offset-1, maxStatementBytes)
			stmt = &ex
		}
	}
	_, err := conn.Exec(ctx, "insert into "+m.history.Quoted()+` (lane, version, name, checksum, started_at, finished_at, host, pid, application_name, error, sqlstate, statement)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)`, l.Name, mig.Version, mig.Name, mig.Checksum, start, m.cfg.Now(), m.host, m.pid, m.appName, msg, sqlstate, stmt)
	if err != nil {
		m.cfg.Logger.Warn().Err(err).Str("lane", l.Name).Msg("could not record the failure in the history table")
		return nil
	}
	return &event{Lane: l.Name, Version: mig.Version, State: wire.Failed, File: mig.Name}
}

// The bounds of what a failed attempt stores in the history table (and so what a status read
// fetches): a failing statement of a multi-megabyte file must not be copied into every status
// read of every replica.
const (
	maxErrorBytes     = 4000 // the error text
	maxStatementBytes = 2000 // the excerpt of the failing statement around the error position
)

// truncate cuts s to at most n bytes at a character boundary, ending with "…" when cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	n -= len("…")
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// excerpt returns at most n bytes of stmt around byte offset pos (the error position; -1 when
// unknown, then the start), cut at character boundaries and marked "…" where cut.
func excerpt(stmt string, pos, n int) string {
	if len(stmt) <= n {
		return stmt
	}
	if pos < 0 || pos > len(stmt) {
		pos = 0
	}
	room := n - 2*len("…")
	start := max(0, pos-room/2)
	end := min(len(stmt), start+room)
	start = max(0, end-room)
	for start < end && !utf8.RuneStart(stmt[start]) {
		start++
	}
	for end < len(stmt) && end > start && !utf8.RuneStart(stmt[end]) {
		end--
	}
	out := stmt[start:end]
	if start > 0 {
		out = "…" + out
	}
	if end < len(stmt) {
		out += "…"
	}
	return out
}

// ensureHistoryTable creates the history table shared by all lanes when it does not exist.
// Lanes run concurrently on different connections, so creation is serialised with a
// transaction-level advisory lock held only for the few milliseconds of the DDL.
func ensureHistoryTable(ctx context.Context, conn *pgx.Conn, t tableName) error {
	var exists bool
	if err := conn.QueryRow(ctx, "select to_regclass($1) is not null", t.Quoted()).Scan(&exists); err != nil {
		return fmt.Errorf("look up history table %s: %w", t, err)
	}
	if exists {
		return nil
	}
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "select pg_advisory_xact_lock($1)", setupLockKey); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, fmt.Sprintf(`create table if not exists %s (
  id bigint generated always as identity primary key,
  lane text not null,
  version int4 not null,
  name text not null,
  checksum text not null,
  started_at timestamptz not null,
  finished_at timestamptz not null,
  duration interval generated always as (finished_at - started_at) stored,
  host text not null,
  pid int4 not null,
  application_name text not null,
  error text,
  sqlstate text,
  statement text
)`, t.Quoted()))
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, fmt.Sprintf("create index if not exists %s on %s (lane, id)",
			pgx.Identifier{t.Name + "_lane_idx"}.Sanitize(), t.Quoted()))
		return err
	})
	if err != nil {
		return fmt.Errorf("create history table %s: %w", t, err)
	}
	return nil
}

// failedBefore returns a *MigrationError wrapping ErrFailedBefore when the lane's last recorded
// attempt was this very migration (same version and checksum) and failed permanently.
func (m *Migrator) failedBefore(ctx context.Context, conn *pgx.Conn, l *loadedLane, mig *Migration) error {
	var (
		version       int32
		checksum      string
		msg, sqlstate *string
	)
	err := conn.QueryRow(ctx, fmt.Sprintf("select version, checksum, left(error, %d), sqlstate from ", maxErrorBytes)+m.history.Quoted()+
		" where lane = $1 and id > coalesce((select retry_from from "+m.controlTable().Quoted()+" where lane = $1), 0) order by id desc limit 1", l.Name).Scan(&version, &checksum, &msg, &sqlstate)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("lane %q: read history: %w", l.Name, err)
	}
	if msg == nil || version != mig.Version || checksum != mig.Checksum || transientSQLState(deref(sqlstate)) {
		return nil
	}
	// The recorded message already names the lane, file and statement.
	return &MigrationError{Lane: l.Name, Version: mig.Version, File: mig.Name,
		SQLState: deref(sqlstate), Err: fmt.Errorf("%w: %s", ErrFailedBefore, *msg)}
}
