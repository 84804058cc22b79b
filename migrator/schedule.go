package migrator

// The fleet's retry schedule: a lane whose migration fails with a transient error (lock
// timeout, serialization failure, deadlock) is tried again at a time stored with the lane, in
// the control table (attempts, next_attempt_at), written by the failing replica while it still
// holds the lane's lock and honoured by every replica under the lock. Adding replicas does not
// add attempts: whichever replica wins the lock at the scheduled time makes the next one.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// ErrRetryLater is returned (wrapped in a *RetryLaterError) by TryMigrate for a lane whose
// next attempt, after transient failures, is scheduled later.
var ErrRetryLater = errors.New("the lane's next attempt is scheduled later")

// RetryLaterError says when a lane's next attempt is due after transient failures.
type RetryLaterError struct {
	Lane     string
	Attempts int           // transient failures in a row so far
	At       time.Time     // the scheduled time, by the server's clock
	In       time.Duration // how long until then, by the server's clock when it was read
}

func (e *RetryLaterError) Error() string {
	return fmt.Sprintf("lane %q: %d transient failure(s) in a row; next attempt in %s", e.Lane, e.Attempts, e.In.Round(time.Millisecond))
}

// Is makes errors.Is(err, ErrRetryLater) true.
func (e *RetryLaterError) Is(target error) bool { return target == ErrRetryLater }

// controlRow is the control table's row of one lane.
type controlRow struct {
	paused   bool
	attempts int
	next     *time.Time
	now      time.Time
}

// readControl reads the lane's control row; a missing table or row reads as the zero row.
func (m *Migrator) readControl(ctx context.Context, q Querier, lane string) (controlRow, error) {
	var c controlRow
	err := q.QueryRow(ctx, "select coalesce(c.paused, false), coalesce(c.attempts, 0), c.next_attempt_at, now() from (select 1) one left join "+
		m.controlTable().Quoted()+" c on c.lane = $1", lane).Scan(&c.paused, &c.attempts, &c.next, &c.now)
	if isUndefinedTable(err) {
		return controlRow{}, nil
	}
	if err != nil {
		return controlRow{}, fmt.Errorf("lane %q: read control: %w", lane, err)
	}
	return c, nil
}

// retryDelay is the wait after the n-th transient failure in a row (n ≥ 1): RetryMin doubled
// n-1 times, at most RetryMax.
func (m *Migrator) retryDelay(n int) time.Duration {
	d := m.cfg.RetryMin
	for i := 1; i < n && d < m.cfg.RetryMax; i++ {
		d *= 2
	}
	return min(d, m.cfg.RetryMax)
}

// scheduleRetry records a transient failure: attempts becomes after+1 and the next attempt is
// due retryDelay(after+1) from now. It runs under the lane's lock.
func (m *Migrator) scheduleRetry(ctx context.Context, conn *pgx.Conn, lane string, after int) {
	n := after + 1
	_, err := conn.Exec(ctx, "insert into "+m.controlTable().Quoted()+` (lane, attempts, next_attempt_at, updated_at)
values ($1, $2, now() + $3::float8 * interval '1 second', now())
on conflict (lane) do update set attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at, updated_at = now()`,
		lane, n, m.retryDelay(n).Seconds())
	if err != nil {
		m.cfg.Logger.Warn().Err(err).Str("lane", lane).Msg("could not store the lane's next attempt")
	}
}

// clearSchedule forgets the lane's transient failures once a migration of it committed.
func (m *Migrator) clearSchedule(ctx context.Context, conn *pgx.Conn, lane string) {
	_, err := conn.Exec(ctx, "update "+m.controlTable().Quoted()+" set attempts = 0, next_attempt_at = null, updated_at = now() where lane = $1 and attempts > 0", lane)
	if err != nil {
		m.cfg.Logger.Warn().Err(err).Str("lane", lane).Msg("could not clear the lane's retry schedule")
	}
}
