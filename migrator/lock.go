package migrator

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// laneLock is a session-level advisory lock on the dedicated connection that applies the lane.
// It is taken with pg_try_advisory_lock only: a session blocked in pg_advisory_lock holds a
// snapshot, and a CREATE INDEX CONCURRENTLY run by the holder would wait for it forever.
type laneLock struct {
	conn *pgx.Conn
	key  int64
}

// tryLock makes one attempt to take the lock.
func (l *laneLock) tryLock(ctx context.Context) (bool, error) {
	var ok bool
	if err := l.conn.QueryRow(ctx, "select pg_try_advisory_lock($1)", l.key).Scan(&ok); err != nil {
		return false, fmt.Errorf("try advisory lock %d: %w", l.key, err)
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
	if _, err := l.conn.Exec(ctx, "select pg_advisory_unlock($1)", l.key); err != nil {
		return fmt.Errorf("release advisory lock %d: %w", l.key, err)
	}
	return nil
}
