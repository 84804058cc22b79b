package migrator

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/wire"
)

// HistoryEntry is one row of the history table: an applied migration, a failed attempt, or a
// version set by Force.
type HistoryEntry struct {
	ID              int64     `json:"id"`
	Lane            string    `json:"lane"`
	Version         int32     `json:"version"`
	File            string    `json:"file"`
	Checksum        string    `json:"checksum"`
	StartedAt       time.Time `json:"started_at"`
	FinishedAt      time.Time `json:"finished_at"`
	DurationSeconds float64   `json:"duration_s"`
	Host            string    `json:"host"`
	PID             int32     `json:"pid"`
	ApplicationName string    `json:"application_name"`
	// Result is "applied", "failed" or "forced".
	Result    string `json:"result"`
	Error     string `json:"error,omitempty"`
	SQLState  string `json:"sqlstate,omitempty"`
	Statement string `json:"statement,omitempty"`
	// ForcedFrom is the version the lane had before Force set Version; nil for other rows.
	ForcedFrom *int32 `json:"forced_from,omitempty"`
}

// The results of a history row.
const (
	ResultApplied = "applied"
	ResultFailed  = "failed"
	ResultForced  = "forced"
)

// History returns the newest rows of the history table, newest first: of one lane, or of every
// lane when lane is "". limit <= 0 means 100. A missing history table is no rows. It takes no
// lock and writes nothing.
func (m *Migrator) History(ctx context.Context, q Querier, lane string, limit int) ([]HistoryEntry, error) {
	if lane != "" {
		if _, ok := m.byName[lane]; !ok {
			return nil, fmt.Errorf("lane %q: %w", lane, ErrUnknownLane)
		}
	}
	if limit <= 0 {
		limit = 100
	}
	// forced_from exists only once Force has run on this history table: read it through
	// to_jsonb so that the query works either way.
	rows, err := q.Query(ctx, `select id, lane, version, name, checksum, started_at, finished_at,
  extract(epoch from finished_at - started_at)::float8, host, pid, application_name,
  coalesce(error, ''), coalesce(sqlstate, ''), coalesce(statement, ''), (to_jsonb(h) ->> 'forced_from')::int4
from `+m.history.Quoted()+` h where $1 = '' or lane = $1 order by id desc limit $2`, lane, limit)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
			return nil, nil
		}
		return nil, fmt.Errorf("read history table %s: %w", m.history, err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (HistoryEntry, error) {
		var e HistoryEntry
		err := row.Scan(&e.ID, &e.Lane, &e.Version, &e.File, &e.Checksum, &e.StartedAt, &e.FinishedAt, &e.DurationSeconds,
			&e.Host, &e.PID, &e.ApplicationName, &e.Error, &e.SQLState, &e.Statement, &e.ForcedFrom)
		switch {
		case e.ForcedFrom != nil:
			e.Result = ResultForced
		case e.Error != "":
			e.Result = ResultFailed
		default:
			e.Result = ResultApplied
		}
		return e, err
	})
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
			return nil, nil
		}
		return nil, fmt.Errorf("read history table %s: %w", m.history, err)
	}
	return out, nil
}

// LockedError is returned by Force when another session holds the lane's lock.
type LockedError struct {
	Lane   string
	Holder string // the holding session as pg_stat_activity shows it; "" when not visible
}

func (e *LockedError) Error() string {
	s := fmt.Sprintf("lane %q is being migrated: another session holds its lock", e.Lane)
	if e.Holder != "" {
		s += " (" + e.Holder + ")"
	}
	return s + "; wait for it to finish or stop it first"
}

// Unwrap makes errors.Is(err, ErrLocked) true.
func (e *LockedError) Unwrap() error { return ErrLocked }

// Force sets the lane's version to version after an operator repaired the database by hand
// (golang-migrate's force, Flyway's repair). It takes the lane's lock without waiting and
// returns a *LockedError (errors.Is ErrLocked) when another session holds it; it runs nothing
// of any migration. In one transaction it writes the version, a history row marked forced
// (with the version it replaced; a recorded failure is then no longer the lane's last attempt,
// so replicas try the next migration again) and announces the change on the Migrator's
// channel. version may be lower than the current one (the migrations above it run again) or
// higher than the latest known to this binary. It returns the version the lane had before.
func (m *Migrator) Force(ctx context.Context, lane string, version int32) (int32, error) {
	l, ok := m.byName[lane]
	if !ok {
		return 0, fmt.Errorf("lane %q: %w", lane, ErrUnknownLane)
	}
	if version < 0 {
		return 0, fmt.Errorf("lane %q: version %d: a version is 0 or more", lane, version)
	}
	conn, err := m.connect(ctx)
	if err != nil {
		return 0, fmt.Errorf("lane %q: %w", lane, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	tables, _, err := m.resolveTables(ctx, conn)
	if err != nil {
		return 0, fmt.Errorf("lane %q: %w", lane, err)
	}
	resolved := tables[l.index]
	lock := m.newLaneLock(conn, l, resolved)
	got, err := lock.tryLock(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("lane %q: %w", lane, err)
	}
	if !got {
		le := &LockedError{Lane: lane}
		err := conn.QueryRow(ctx, `select format('pid %s, application %s, %s, connected since %s', a.pid, a.application_name, coalesce(a.client_addr::text, 'local socket'), a.backend_start)
from pg_locks l join pg_stat_activity a using (pid)
where l.locktype = 'advisory' and l.granted and l.database = (select oid from pg_database where datname = current_database())
  and l.classid = $1 and l.objid = $2 and l.objsubid = 1 limit 1`,
			uint32(uint64(lock.keys[0])>>32), uint32(uint64(lock.keys[0]))).Scan(&le.Holder)
		if errors.Is(err, pgx.ErrNoRows) {
			// No session holds it: a timed lease does (an applier through a transaction pooler).
			_ = conn.QueryRow(ctx, "select format('lease of %s, epoch %s, until %s', holder, epoch, expires_at) from "+m.leaseTable().Quoted()+" where key = $1",
				lock.keys[0]).Scan(&le.Holder)
		}
		return 0, le
	}
	defer func() { _ = lock.unlock(ctx) }()
	if err := ensureHistoryTable(ctx, conn, m.history); err != nil {
		return 0, fmt.Errorf("lane %q: %w", lane, err)
	}
	if err := ensureVersionTable(ctx, conn, lane, resolved.table, m.history); err != nil {
		return 0, fmt.Errorf("lane %q: %w", lane, err)
	}
	var from int32
	name, checksum := "", ""
	if int(version) >= 1 && int(version) <= len(l.migrations) {
		name, checksum = l.migrations[version-1].Name, l.migrations[version-1].Checksum
	}
	now := m.cfg.Now()
	state := wire.Applied
	if version >= l.latest() {
		state = wire.Done
	}
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if err := lock.fence(ctx, tx); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "alter table "+m.history.Quoted()+" add column if not exists forced_from int4"); err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, "select coalesce(max(version), 0) from "+resolved.table.Quoted()).Scan(&from); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "update "+resolved.table.Quoted()+" set version = $1", version); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "insert into "+m.history.Quoted()+` (lane, version, name, checksum, started_at, finished_at, host, pid, application_name, forced_from)
values ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9)`, lane, version, name, checksum, now, m.host, m.pid, m.appName, from); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "select pg_notify($1, $2)", m.cfg.Channel, event{Lane: lane, Version: version, State: state, File: name}.Payload())
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("lane %q: force version %d: %w", lane, version, err)
	}
	m.cfg.Logger.Warn().Str("lane", lane).Int32("from", from).Int32("version", version).Msg("version forced")
	return from, nil
}
