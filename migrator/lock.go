package migrator

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// laneLock is a session-level advisory lock on the dedicated connection that applies the lane.
// It is taken with pg_try_advisory_lock only: a session blocked in pg_advisory_lock holds a
// snapshot, and a CREATE INDEX CONCURRENTLY run by the holder would wait for it forever. A lane
// may have two keys (see loadedLane.lockKeys): the lock is held when both are, and one attempt
// takes both or neither.
type laneLock struct {
	conn *pgx.Conn
	keys []int64 // one or two
}

// tryLock makes one attempt to take the lock.
func (l *laneLock) tryLock(ctx context.Context) (bool, error) {
	var ok bool
	var err error
	if len(l.keys) == 1 {
		err = l.conn.QueryRow(ctx, "select pg_try_advisory_lock($1)", l.keys[0]).Scan(&ok)
	} else {
		// CASE evaluates its branches in order: the second key is tried only once the first is
		// held, and the first is released when the second is not free.
		err = l.conn.QueryRow(ctx, `select case when pg_try_advisory_lock($1) then
  case when pg_try_advisory_lock($2) then true else not pg_advisory_unlock($1) end
else false end`, l.keys[0], l.keys[1]).Scan(&ok)
	}
	if err != nil {
		return false, fmt.Errorf("try advisory lock %d: %w", l.keys[0], err)
	}
	return ok, nil
}

// unlock releases the lock. It runs on a context detached from ctx's cancellation, bounded by
// its own timeout, because it must happen after the caller gave up too. If the connection is
// gone the server has already released the lock with the session.
func (l *laneLock) unlock(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if l.conn.IsClosed() {
		return nil
	}
	q, args := "select pg_advisory_unlock($1)", []any{l.keys[0]}
	if len(l.keys) == 2 {
		q, args = "select pg_advisory_unlock($1), pg_advisory_unlock($2)", []any{l.keys[0], l.keys[1]}
	}
	if _, err := l.conn.Exec(ctx, q, args...); err != nil {
		return fmt.Errorf("release advisory lock %d: %w", l.keys[0], err)
	}
	return nil
}
