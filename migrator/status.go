package migrator

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Querier runs queries: a *pgx.Conn, a *pgxpool.Pool or a pgx.Tx.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// State is a lane's state as seen from one binary.
type State string

// The states of a lane.
const (
	StatePending State = "pending" // migrations known to this binary are not applied yet
	StateRunning State = "running" // a session holds the lane's lock and is applying
	StateFailed  State = "failed"  // the last attempt failed; see LaneStatus.Error
	StateDone    State = "done"    // every migration known to this binary is applied
	StateAhead   State = "ahead"   // done, and the database knows migrations this binary does not
	StatePaused  State = "paused"  // an operator paused the lane (Migrator.Pause); nothing runs
	StatePausing State = "pausing" // paused, and the applier has not reached its next batch boundary yet
	// StateDrift: applied migrations were renamed or changed since they were applied (see
	// LaneStatus.Drift); set by AddDrift unless Config.AllowDrift.
	StateDrift State = "drift"
)

// Failure is the last failed attempt of a lane, from the history table.
type Failure struct {
	Version   int32     `json:"version"`
	File      string    `json:"file"`
	Checksum  string    `json:"checksum"` // of the failed file as rendered by the binary that ran it
	SQLState  string    `json:"sqlstate,omitempty"`
	Transient bool      `json:"transient"` // the error is of a kind that is retried (transientSQLState)
	Statement string    `json:"statement,omitempty"`
	At        time.Time `json:"at"`
}

// LaneStatus is one lane's state in the database, compared with this binary's files.
type LaneStatus struct {
	Name         string   `json:"name"`
	Mode         string   `json:"mode"`
	VersionTable string   `json:"version_table"` // schema-qualified, as resolved by the session that read it
	Version      int32    `json:"version"`       // applied version, 0 when the version table does not exist
	Latest       int32    `json:"latest"`        // highest version known to this binary
	State        State    `json:"state"`
	Error        string   `json:"error"` // the last failed attempt's error while the lane is not past it; "" otherwise
	Failure      *Failure `json:"failure,omitempty"`
	Locked       bool     `json:"locked"`          // a session holds the lane's lock
	Drift        []string `json:"drift,omitempty"` // applied migrations renamed or changed since (filled by AddDrift)
	Paused       bool     `json:"paused"`          // an operator paused the lane (Migrator.Pause)
	// Attempts counts the transient failures in a row of the lane's next migration, and
	// NextAttempt is when any replica may try it again (the fleet's retry schedule, see
	// Config.RetryMin); zero and nil otherwise.
	Attempts    int        `json:"attempts,omitempty"`
	NextAttempt *time.Time `json:"next_attempt,omitempty"`
	// Progress is the running batched migration's durable progress; nil while none runs.
	Progress *Progress `json:"progress"`
}

// Redacted returns the status with the string literals of its error and failed statement
// masked (MaskLiterals), for outputs that anyone may read, such as an unauthenticated HTTP
// endpoint: the error of a failing `alter role ... password '...'` quotes the password. The
// history table and `lanes status`, read with database credentials, keep the text.
func (s LaneStatus) Redacted() LaneStatus {
	s.Error = MaskLiterals(s.Error)
	if s.Failure != nil {
		f := *s.Failure
		f.Statement = MaskLiterals(f.Statement)
		s.Failure = &f
	}
	return s
}

// Done reports whether every migration known to this binary is applied.
func (s LaneStatus) Done() bool { return s.Version >= s.Latest }

// Status reads every lane's state without taking any lock. It costs three round trips: the lanes'
// version tables resolved to schema-qualified names (an error when two lanes resolve to the same
// table), then one query over them, then
// one over the progress and control tables (once they exist).
func (m *Migrator) Status(ctx context.Context, q Querier) ([]LaneStatus, error) {
	return m.status.run(ctx, q)
}

// statusQuery reads every lane's state: which tables exist, then one union query over them.
type statusQuery struct {
	m *Migrator
}

func newStatusQuery(m *Migrator) statusQuery { return statusQuery{m: m} }

func (s statusQuery) run(ctx context.Context, q Querier) ([]LaneStatus, error) {
	tables, historyExists, err := s.m.resolveTables(ctx, q)
	if err != nil {
		return nil, err
	}

	var b strings.Builder
	for i, l := range s.m.lanes {
		if i > 0 {
			b.WriteString("\nunion all\n")
		}
		version := "0"
		if tables[i].exists {
			version = "(select max(version) from " + tables[i].table.Quoted() + ")"
		}
		var held []string
		for _, key := range l.lockKeys(tables[i]) {
			held = append(held, fmt.Sprintf("(%d, %d)", uint32(uint64(key)>>32), uint32(uint64(key))))
		}
		lease := ""
		if tables[i].leases {
			lease = fmt.Sprintf("\n  or exists (select 1 from %s ls where ls.key = %d and %s)", s.m.leaseTable().Quoted(), l.lockKeys(tables[i])[0], leaseHeldSQL)
		}
		fmt.Fprintf(&b, `select %d, coalesce(%s, 0),
  exists (select 1 from pg_locks where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database())
    and (classid::int8, objid::int8) in (%s) and objsubid = 1 and granted)%s`,
			i, version, strings.Join(held, ", "), lease)
		if historyExists {
			// left(): rows written by earlier releases may hold a whole multi-megabyte statement;
			// a status read (every replica, on every notification) fetches a bounded part only.
			fmt.Fprintf(&b, `, h.version, h.name, left(h.error, %d), h.sqlstate, left(h.statement, %d), h.finished_at, h.checksum, h.id
from (select 1) one left join lateral (select version, name, error, sqlstate, statement, finished_at, checksum, id from %s
  where lane = '%s' order by id desc limit 1) h on true`, maxErrorBytes, maxStatementBytes, s.m.history.Quoted(), l.Name)
		} else {
			b.WriteString(", null::int4, null::text, null::text, null::text, null::text, null::timestamptz, null::text, null::int8")
		}
	}
	rows, err := q.Query(ctx, b.String())
	if err != nil {
		return nil, fmt.Errorf("read lane versions: %w", err)
	}
	defer rows.Close()
	out := make([]LaneStatus, len(s.m.lanes))
	historyIDs := map[string]int64{}
	for rows.Next() {
		var (
			i                   int
			st                  LaneStatus
			hVersion            *int32
			hName, hErr, hState *string
			hStatement, hSum    *string
			hAt                 *time.Time
			hID                 *int64
		)
		if err := rows.Scan(&i, &st.Version, &st.Locked, &hVersion, &hName, &hErr, &hState, &hStatement, &hAt, &hSum, &hID); err != nil {
			return nil, fmt.Errorf("read lane versions: %w", err)
		}
		l := s.m.lanes[i]
		if hID != nil {
			historyIDs[l.Name] = *hID
		}
		st.Name, st.Mode, st.VersionTable, st.Latest = l.Name, l.Mode.String(), tables[i].table.String(), l.latest()
		switch {
		case st.Version > st.Latest:
			st.State = StateAhead
		case st.Version == st.Latest:
			st.State = StateDone
		case st.Locked:
			st.State = StateRunning
		default:
			st.State = StatePending
		}
		if hErr != nil && hVersion != nil && *hVersion > st.Version {
			st.Error = *hErr
			st.Failure = &Failure{Version: *hVersion, File: deref(hName), SQLState: deref(hState), Statement: deref(hStatement), Transient: transientSQLState(deref(hState)), Checksum: deref(hSum)}
			if hAt != nil {
				st.Failure.At = *hAt
			}
			if st.State == StatePending {
				st.State = StateFailed
			}
		}
		out[i] = st
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read lane versions: %w", err)
	}
	rows.Close()
	extras, err := s.m.readExtras(ctx, q)
	if err != nil {
		return nil, err
	}
	applyExtras(out, extras, historyIDs)
	return out, nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
