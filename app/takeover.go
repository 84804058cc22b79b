package app

// Takeover: how a waiting replica learns that the lane's holder is gone (the listener's lock
// check, the holder's "released" announcement) and when it tries the lock again.

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/backoff"
	"github.com/multilanes/lanes/migrator"
)

// check runs on the listener's connection every PingInterval, in place of its ping. For each
// background lane this replica waits for, it asks in one statement whether the lane's lock is
// free (taking and releasing it at once); if so it marks the lane unlocked, which wakes the
// waiting goroutine to take the lane over. With no lane to watch it is a plain ping.
func (r *Runtime) check(ctx context.Context, conn *pgx.Conn) error {
	var waiting []string
	r.mu.Lock()
	for _, l := range r.lanes {
		if s := r.state[l.Name]; s.role == "waiting" && !s.status.Done() {
			waiting = append(waiting, l.Name)
		}
	}
	r.mu.Unlock()
	if len(waiting) == 0 {
		return conn.Ping(ctx)
	}
	for _, lane := range waiting {
		free, err := r.lockFree(ctx, conn, lane)
		if err != nil {
			return err
		}
		if free {
			r.setLocked(lane, false, "check")
		}
	}
	return nil
}

// lockFree reports whether the lane's lock is free, taking and releasing it at once: one
// statement.
func (r *Runtime) lockFree(ctx context.Context, conn *pgx.Conn, lane string) (bool, error) {
	key, err := r.m.ApplierLockKey(lane) // no query
	if err != nil {
		return false, err
	}
	var free bool
	err = conn.QueryRow(ctx, "select case when pg_try_advisory_lock($1) then pg_advisory_unlock($1) else false end", key).Scan(&free)
	return free, err
}

// setLocked records whether the lane's lock was seen held.
func (r *Runtime) setLocked(lane string, locked bool, via string) {
	r.modify(lane, via, noRead, func(st *migrator.LaneStatus) { st.Locked = locked })
}

// waitForHolder waits while another session holds the lane's lock: until the listener reports
// the lane done or its lock free, or TakeoverInterval passes, or ctx is done.
func (r *Runtime) waitForHolder(ctx context.Context, lane string) error {
	return r.waitWhile(ctx, lane, func(st migrator.LaneStatus) bool { return st.Locked && !st.Done() })
}

// waitWhile waits while hold is true of the lane's state: it re-checks on every change the
// listener reports and returns when hold is false, after TakeoverInterval (jittered) in case a
// change was missed, or with ctx's error.
func (r *Runtime) waitWhile(ctx context.Context, lane string, hold func(migrator.LaneStatus) bool) error {
	t := time.NewTimer(backoff.Jitter(r.cfg.TakeoverInterval))
	defer t.Stop()
	for {
		st, changed := r.laneStatus(lane)
		if !hold(st) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return nil
		case <-changed:
		}
	}
}

// waitForChange waits until the lane's state changes, TakeoverInterval passes or ctx is done.
func (r *Runtime) waitForChange(ctx context.Context, changed <-chan struct{}) error {
	t := time.NewTimer(backoff.Jitter(r.cfg.TakeoverInterval))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-changed:
	case <-t.C:
	}
	return nil
}
