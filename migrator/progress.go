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

// DefaultProgressTable and DefaultControlTable are the names of the tables holding batched
// migrations' progress and the lanes' pause and retry state; they live in the schema of the
// history table.
const (
	DefaultProgressTable = "lanes_progress"
	DefaultControlTable  = "lanes_control"
)

// Progress is how far a running migration is. For a batched migration it is durable (the
// progress table, committed with each batch) and announced at most once a second on the
// Migrator's channel; for a long file that is not batched it tells what the server knows.
type Progress struct {
	Lane    string `json:"lane"`
	Version int32  `json:"version"`
	File    string `json:"file"`
	// Done counts the keys walked so far (a Range walk or an SQL file), or the batches run
	// (a Cursor walk).
	Done int64 `json:"done"`
	// Total is the number of keys to walk, estimated when the walk started (pg_class.reltuples,
	// or count(*) for a table never analyzed); 0 when unknown.
	Total int64 `json:"total"`
	// Percent is Done/Total, below 100 until the migration has committed; null when Total is
	// unknown.
	Percent *float64 `json:"percent"`
	// RatePerS is the recent rate in Done units per second.
	RatePerS float64 `json:"rate_per_s"`
	// ETASeconds is (Total-Done)/RatePerS; null when either is unknown.
	ETASeconds *float64 `json:"eta_seconds"`
	// Throttled says why batches are held back right now ("" when they are not).
	Throttled string `json:"throttled"`
	// Health tells a database health reading that could not be made (say, a replication lag
	// that the role may not read).
	Health string `json:"health,omitempty"`
	// BatchSize is the current batch size.
	BatchSize int `json:"batch_size,omitempty"`
	// Phase is what a migration that is not batched is doing, when the server says (an index
	// build's phase and blocks done).
	Phase string `json:"phase,omitempty"`
	// ElapsedSeconds is how long the migration has run, for one that is not batched.
	ElapsedSeconds *float64  `json:"elapsed_seconds,omitempty"`
	StartedAt      time.Time `json:"started_at,omitzero"`
	UpdatedAt      time.Time `json:"updated_at"`
}

// fill computes Percent and ETASeconds from Done, Total and RatePerS.
func (p *Progress) fill() {
	p.Percent, p.ETASeconds = wire.PercentETA(p.Done, p.Total, p.RatePerS)
}

// sideTable returns a table named name in the schema of the history table.
func (m *Migrator) sideTable(name string) tableName {
	return tableName{Schema: m.history.Schema, Name: name}
}

func (m *Migrator) progressTable() tableName { return m.sideTable(DefaultProgressTable) }
func (m *Migrator) controlTable() tableName  { return m.sideTable(DefaultControlTable) }

// ensureSideTables creates the progress and control tables when they do not exist, serialised
// across lanes and processes like the history table.
func (m *Migrator) ensureSideTables(ctx context.Context, conn *pgx.Conn) error {
	p, c := m.progressTable(), m.controlTable()
	var exist bool
	if err := conn.QueryRow(ctx, `select to_regclass($1) is not null and to_regclass($2) is not null
  and exists (select from pg_attribute where attrelid = to_regclass($2) and attname = 'next_attempt_at' and not attisdropped)`, p.Quoted(), c.Quoted()).Scan(&exist); err != nil {
		return fmt.Errorf("look up tables %s and %s: %w", p, c, err)
	}
	if exist {
		return nil
	}
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "select pg_advisory_xact_lock($1)", setupLockKey); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, fmt.Sprintf(`create table if not exists %s (
  lane text not null,
  version int4 not null,
  file text not null,
  checksum text not null,
  lower_key int8,
  upper_key int8,
  cursor text not null default '',
  done int8 not null default 0,
  total int8,
  batches int8 not null default 0,
  batch_size int4 not null default 0,
  rate_per_s float8 not null default 0,
  throttled text not null default '',
  health text not null default '',
  phase text not null default '',
  started_at timestamptz not null,
  updated_at timestamptz not null,
  finished_at timestamptz,
  primary key (lane, version)
);
create table if not exists %s (
  lane text primary key,
  paused bool not null default false,
  retry_from int8 not null default 0,
  updated_at timestamptz not null default now()
);
alter table %s add column if not exists attempts int4 not null default 0,
  add column if not exists next_attempt_at timestamptz`, p.Quoted(), c.Quoted(), c.Quoted()))
		return err
	})
	if err != nil {
		return fmt.Errorf("create tables %s and %s: %w", p, c, err)
	}
	return nil
}

// laneExtras is what the progress and control tables say about one lane.
type laneExtras struct {
	progress *Progress
	paused   bool
	cleared  int64      // failures with a history id up to this were cleared by Retry
	attempts int        // transient failures in a row (the fleet's retry schedule)
	next     *time.Time // when the next attempt is due after them
}

// readExtras reads the running progress and the control row of every lane. Missing tables
// read as nothing.
func (m *Migrator) readExtras(ctx context.Context, q Querier) (map[string]*laneExtras, error) {
	out := map[string]*laneExtras{}
	schedule := m.sideSeen.Load()
	if !schedule {
		var exist bool
		if err := q.QueryRow(ctx, `select to_regclass($1) is not null and to_regclass($2) is not null,
  exists (select from pg_attribute where attrelid = to_regclass($2) and attname = 'next_attempt_at' and not attisdropped)`,
			m.progressTable().Quoted(), m.controlTable().Quoted()).Scan(&exist, &schedule); err != nil {
			return nil, fmt.Errorf("look up progress tables: %w", err)
		}
		if !exist {
			return out, nil
		}
		if schedule { // tables created by an earlier release get the schedule when a lane runs
			m.sideSeen.Store(true) // tables are not dropped behind a running Migrator
		}
	}
	scheduleCols := "0, null::timestamptz"
	if schedule {
		scheduleCols = "c.attempts, c.next_attempt_at"
	}
	rows, err := q.Query(ctx, `select c.lane, c.paused, c.retry_from, `+scheduleCols+`, null, 0, 0, null, 0, '', '', '', 0, null, null from `+m.controlTable().Quoted()+` c
union all
select p.lane, false, 0, 0, null, p.version, p.done, coalesce(p.total, 0), p.file, p.rate_per_s, p.throttled, p.health, p.phase, p.batch_size, p.started_at, p.updated_at
from `+m.progressTable().Quoted()+` p where p.finished_at is null`)
	if err != nil {
		if isUndefinedTable(err) {
			return out, nil
		}
		return nil, fmt.Errorf("read progress: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var (
			lane                     string
			paused                   bool
			retryFrom                int64
			attempts                 int
			next                     *time.Time
			version                  *int32
			p                        Progress
			file                     *string
			started, updated         *time.Time
			throttled, health, phase string
		)
		if err := rows.Scan(&lane, &paused, &retryFrom, &attempts, &next, &version, &p.Done, &p.Total, &file, &p.RatePerS, &throttled, &health, &phase, &p.BatchSize, &started, &updated); err != nil {
			return nil, fmt.Errorf("read progress: %w", err)
		}
		e := out[lane]
		if e == nil {
			e = &laneExtras{}
			out[lane] = e
		}
		if version == nil {
			e.paused, e.cleared, e.attempts, e.next = paused, retryFrom, attempts, next
			continue
		}
		p.Lane, p.Version, p.File, p.Throttled, p.Health, p.Phase = lane, *version, deref(file), throttled, health, phase
		if started != nil {
			p.StartedAt = *started
		}
		if updated != nil {
			p.UpdatedAt = *updated
		}
		if phase != "" && started != nil && updated != nil {
			e := updated.Sub(*started).Round(time.Second).Seconds()
			p.ElapsedSeconds = &e
		}
		p.fill()
		if e.progress == nil || p.Version > e.progress.Version {
			e.progress = &p
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read progress: %w", err)
	}
	return out, nil
}

// applyExtras adds progress, pause and cleared failures to the lanes' status.
func applyExtras(lanes []LaneStatus, extras map[string]*laneExtras, historyIDs map[string]int64) {
	for i := range lanes {
		st := &lanes[i]
		e := extras[st.Name]
		if e == nil {
			continue
		}
		if e.progress != nil && e.progress.Version == st.Version+1 && !st.Done() {
			st.Progress = e.progress
		}
		if st.Failure != nil && historyIDs[st.Name] <= e.cleared {
			st.Failure, st.Error = nil, ""
			if st.State == StateFailed {
				st.State = StatePending
			}
		}
		if e.next != nil && e.attempts > 0 && !st.Done() {
			at := *e.next
			st.Attempts, st.NextAttempt = e.attempts, &at
		}
		if e.paused && !st.Done() {
			st.Paused = true
			switch st.State {
			case StatePending, StateFailed:
				st.State = StatePaused
			case StateRunning:
				st.State = StatePausing // the applier stops at its next batch boundary
			}
		}
	}
}

// isUndefinedTable reports whether err is PostgreSQL's undefined_table (42P01).
func isUndefinedTable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42P01"
}
