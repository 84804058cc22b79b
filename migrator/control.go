package migrator

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// ErrPaused is returned (wrapped) by Migrate and TryMigrate for a lane an operator paused: a
// batched migration stops at its next batch boundary, and no migration of the lane starts,
// until Resume.
var ErrPaused = errors.New("lane is paused (resume it with: lanes resume --lane NAME)")

// Pause stores that the background lane is paused, in the control table next to the history
// table (so it survives restarts, takeovers and deploys), and announces it. The replica
// applying the lane stops at its next batch boundary (a migration that is not batched finishes
// first); no replica starts the lane's next migration until Resume. Pausing does not change
// readiness. Blocking lanes cannot be paused: replicas wait for them before serving.
func (m *Migrator) Pause(ctx context.Context, conn *pgx.Conn, lane string) error {
	return m.setPaused(ctx, conn, lane, true)
}

// Resume clears a pause set by Pause and announces it, so a replica takes the lane up again
// (a batched migration continues from its last committed batch).
func (m *Migrator) Resume(ctx context.Context, conn *pgx.Conn, lane string) error {
	return m.setPaused(ctx, conn, lane, false)
}

func (m *Migrator) setPaused(ctx context.Context, conn *pgx.Conn, lane string, paused bool) error {
	l, ok := m.byName[lane]
	if !ok {
		return fmt.Errorf("lane %q: %w", lane, ErrUnknownLane)
	}
	if paused && l.Mode == Blocking {
		return fmt.Errorf("lane %q is a blocking lane: replicas wait for it before serving, so it cannot be paused", lane)
	}
	if err := m.ensureSideTables(ctx, conn); err != nil {
		return fmt.Errorf("lane %q: %w", lane, err)
	}
	control := "resume"
	if paused {
		control = "pause"
	}
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "insert into "+m.controlTable().Quoted()+` (lane, paused, updated_at) values ($1, $2, now())
on conflict (lane) do update set paused = excluded.paused, updated_at = now()`, lane, paused); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "select pg_notify($1, $2)", m.cfg.Channel, event{Lane: lane, Control: control}.Payload())
		return err
	})
	if err != nil {
		return fmt.Errorf("lane %q: %s: %w", lane, control, err)
	}
	return nil
}

// Retry clears the lane's recorded failure so that replicas try the failed migration again
// without a change to its file (for a data problem fixed by hand), and announces it. The
// failure stays in the history table. It returns false when the lane had no failure to clear.
func (m *Migrator) Retry(ctx context.Context, conn *pgx.Conn, lane string) (bool, error) {
	if _, ok := m.byName[lane]; !ok {
		return false, fmt.Errorf("lane %q: %w", lane, ErrUnknownLane)
	}
	if err := ensureHistoryTable(ctx, conn, m.history); err != nil {
		return false, fmt.Errorf("lane %q: %w", lane, err)
	}
	if err := m.ensureSideTables(ctx, conn); err != nil {
		return false, fmt.Errorf("lane %q: %w", lane, err)
	}
	var cleared bool
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		var id *int64
		var failed bool
		err := tx.QueryRow(ctx, "select id, error is not null from "+m.history.Quoted()+" where lane = $1 order by id desc limit 1", lane).Scan(&id, &failed)
		if errors.Is(err, pgx.ErrNoRows) || (err == nil && !failed) {
			return nil
		}
		if err != nil {
			return err
		}
		cleared = true
		if _, err := tx.Exec(ctx, "insert into "+m.controlTable().Quoted()+` (lane, retry_from, updated_at) values ($1, $2, now())
on conflict (lane) do update set retry_from = excluded.retry_from, attempts = 0, next_attempt_at = null, updated_at = now()`, lane, *id); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "select pg_notify($1, $2)", m.cfg.Channel, event{Lane: lane, Control: "retry"}.Payload())
		return err
	})
	if err != nil {
		return false, fmt.Errorf("lane %q: retry: %w", lane, err)
	}
	return cleared, nil
}

// isPaused reads whether the lane is paused; a missing control table means not paused.
func (m *Migrator) isPaused(ctx context.Context, q Querier, lane string) (bool, error) {
	var paused bool
	err := q.QueryRow(ctx, "select coalesce((select paused from "+m.controlTable().Quoted()+" where lane = $1), false)", lane).Scan(&paused)
	if isUndefinedTable(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("lane %q: read pause: %w", lane, err)
	}
	return paused, nil
}
