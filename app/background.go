package app

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/backoff"
	"github.com/multilanes/lanes/internal/connerr"
	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/lanestate"
	"github.com/multilanes/lanes/internal/pgconnect"
	"github.com/multilanes/lanes/migrator"
)

// runBackground applies the background lanes in order: a lane starts only once the lanes before
// it are done in the database, whichever replica applied them. Then it waits for a lane to stop
// being done (its version moved backwards: a restore) and applies the lanes again, blocking
// lanes included, in the same order, until ctx is done.
func (r *Runtime) runBackground(ctx context.Context) {
	var conn *pgx.Conn
	closeConn := func() {
		if conn != nil {
			cctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_ = conn.Close(cctx) // nothing is left to do on this connection
			conn = nil
		}
	}
	defer closeConn()
	again := false
	for {
		for _, l := range r.lanes {
			if l.Mode != migrator.Background && !again {
				continue // Start applied the blocking lanes
			}
			if err := r.runLane(ctx, &conn, l); err != nil {
				return // stopped
			}
		}
		if again {
			r.log.Info().Msg("lanes applied again after their version moved backwards")
		} else {
			r.log.Info().Msg("background lanes done")
		}
		closeConn() // hold no connection between deploys
		if err := r.waitForRegression(ctx); err != nil {
			return
		}
		again = true
	}
}

// waitForRegression waits until a lane is not done anymore, or ctx is done.
func (r *Runtime) waitForRegression(ctx context.Context) error {
	for {
		r.mu.Lock()
		changed, regressed := r.changed, false
		for _, l := range r.lanes {
			regressed = regressed || !r.state[l.Name].status.Done()
		}
		r.mu.Unlock()
		if regressed {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

// runLane returns once the lane is done, or ctx's error. This replica applies the lane when it
// wins the lane's lock; otherwise it follows the listener's updates and tries the lock again when
// the listener's check finds it free or the holder announces it released it (how it takes the
// lane over from a replica that died or stopped), and at the latest after TakeoverInterval.
func (r *Runtime) runLane(ctx context.Context, conn **pgx.Conn, l migrator.LaneInfo) error {
	defer r.setRole(l.Name, "")
	retries := 0
	waited := false // another session held the lane's lock since this replica last ran it
	for {
		st, changed := r.laneStatus(l.Name)
		if st.Done() {
			return nil
		}
		back := r.backSignal() // taken before the attempt: a reconnect during it ends the backoff after it
		if lanestate.BlockingFailure(l, st, l.Latest) != nil {
			// A permanent failure of this very file: retrying cannot help. Wait until another
			// replica (a fixed deploy) moves the lane on.
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-changed:
				continue
			}
		}
		if *conn == nil {
			c, err := engine.Connect(ctx, r.m)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r.log.Warn().Err(connerr.Compact(err)).Str("lane", l.Name).Msg("cannot connect to apply the lane; retrying")
				if err := r.backoff(ctx, &retries, back); err != nil {
					return err
				}
				continue
			}
			*conn = c
		}
		r.setRole(l.Name, "applying")
		r.setMigrating(l.Name, true)
		mark := r.readMark()
		res, err := r.m.TryMigrate(engine.WithConn(migrator.WithTrace(ctx, r.trace), *conn), l.Name)
		r.setMigrating(l.Name, false)
		r.setRole(l.Name, "")
		if (*conn).IsClosed() {
			*conn = nil
		}
		if err != nil && ctx.Err() == nil && *conn != nil && !errors.Is(err, migrator.ErrLocked) && !errors.Is(err, migrator.ErrPaused) &&
			r.foundReadOnly(ctx, *conn, l.Name) {
			// Nothing can be applied here until the server takes writes: the listener's checks
			// watch for that and end this wait (databaseBack); the backoff bounds it anyway.
			if err := r.backoff(ctx, &retries, back); err != nil {
				return err
			}
			continue
		}
		if err == nil {
			r.clearReadOnly()
		}
		var me *migrator.MigrationError
		var drift *migrator.DriftError
		if waited && (res.Applied > 0 || errors.As(err, &me) && !errors.Is(err, migrator.ErrFailedBefore)) {
			// This replica took the lock another session held, and ran (part of) the lane's
			// work: it applied a migration, or one failed under its lock.
			r.metrics.takeovers.WithLabelValues(l.Name).Inc()
			r.log.Info().Str("lane", l.Name).Int32("from", res.From).Msg("took the background lane over")
			waited = false
		}
		switch {
		case err == nil:
			retries = 0
			r.applied(res, mark)
			if res.Applied > 0 && res.To >= l.Latest {
				r.log.Info().Str("lane", l.Name).Int32("version", res.To).Msg("background lane applied by this replica")
			}
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, migrator.ErrPaused):
			// An operator paused the lane: nothing runs until `lanes resume`, announced.
			retries = 0
			r.log.Info().Str("lane", l.Name).Msg("background lane paused; waiting for resume")
			r.modify(l.Name, "check", noRead, func(st *migrator.LaneStatus) {
				st.Paused, st.Locked = true, false
				if st.State != migrator.StateDone && st.State != migrator.StateAhead {
					st.State = migrator.StatePaused
				}
			})
			if err := r.waitForResume(ctx, l.Name); err != nil {
				return err
			}
		case errors.Is(err, migrator.ErrRetryLater):
			// Transient failures in a row: the schedule stored with the lane says when the
			// next attempt is due, whichever replica makes it (a little later here, so that
			// the replicas do not all arrive in the same instant).
			var rl *migrator.RetryLaterError
			errors.As(err, &rl)
			retries = 0
			r.log.Debug().Str("lane", l.Name).Int("attempts", rl.Attempts).Float64("next_attempt_in_s", rl.In.Seconds()).Msg("waiting for the lane's next scheduled attempt")
			if err := backoff.Sleep(ctx, rl.In+time.Duration(rand.Int64N(int64(min(rl.In/10, backJitter))+1))); err != nil {
				return err
			}
		case errors.Is(err, migrator.ErrLocked):
			// Another replica is applying the lane. Follow it through the listener; the lane's
			// successor checks the lock (see takeover.go), and TakeoverInterval bounds the wait
			// in any case. Keep no connection meanwhile: it would double the connections of
			// every waiting replica.
			retries = 0
			r.setLocked(l.Name, true, "check")
			r.setRole(l.Name, "waiting")
			if *conn != nil {
				r.readHolder(ctx, *conn, l.Name)
				closeQuietly(*conn)
				*conn = nil
			} else {
				// The connection broke as the run stopped (a lease lost while cut off).
				r.setHolder(l.Name, 0)
			}
			waited = true
			began := time.Now()
			err := r.waitForHolder(ctx, l.Name)
			r.metrics.lockWait.WithLabelValues(l.Name).Add(time.Since(began).Seconds())
			if err != nil {
				return err
			}
		case errors.As(err, &drift):
			// Applied files changed: an operator must decide (restore them or allow drift).
			r.log.Error().Err(err).Str("lane", l.Name).Msg("background lane stopped: applied migrations changed since they were applied")
			if err := r.waitForChange(ctx, changed); err != nil {
				return err
			}
		case errors.As(err, &me) && !me.Transient():
			r.log.Error().Err(err).Str("lane", l.Name).Str("file", me.File).
				Msg("background migration failed; it is recorded and will not be retried until the file changes")
			r.failed(l, me)
		case !migrator.IsTransient(err) && me == nil:
			// Not a migration's error but not transient either (permission denied on the
			// version table's schema, a missing schema): say so as an error and try again
			// after TakeoverInterval or when the lane changes, not in a loop.
			r.log.Error().Err(err).Str("lane", l.Name).Msg("background lane cannot proceed; trying again later")
			if err := r.waitForChange(ctx, changed); err != nil {
				return err
			}
		case me != nil && *conn != nil:
			// A transient failure of a migration under this replica's lock: the next attempt
			// is scheduled with the lane (the next TryMigrate says when); each attempt is
			// logged once, by the replica that makes it.
			retries = 0
			r.log.Warn().Err(connerr.Compact(err)).Str("lane", l.Name).Str("file", me.File).Msg("background migration failed with a transient error; retrying at the lane's schedule")
		default:
			r.log.Warn().Err(connerr.Compact(err)).Str("lane", l.Name).Msg("background lane interrupted by a transient error; retrying with backoff, or as soon as the listener is back")
			if err := r.backoff(ctx, &retries, back); err != nil {
				return err
			}
		}
	}
}

// ReadOnly is a server that refuses writes, as a replica found it when it tried to apply a
// lane: a hot standby (in recovery), or a server, database or role with
// default_transaction_read_only on. The replica logs it once; its lanes wait until the server
// takes writes (a promotion), which its listener checks at every check or poll.
type ReadOnly struct {
	InRecovery bool      `json:"in_recovery"`
	Reason     string    `json:"reason"` // "read-only (in recovery: a hot standby)" or "read-only (default_transaction_read_only)"
	Since      time.Time `json:"since"`
}

// foundReadOnly asks the server, after a failed attempt at the lane, whether it refuses writes;
// if so it records and logs that (once until the server takes writes again) and returns true.
func (r *Runtime) foundReadOnly(ctx context.Context, conn *pgx.Conn, lane string) bool {
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	srv, err := pgconnect.ReadServer(qctx, conn)
	if err != nil || !srv.ReadOnly {
		return false
	}
	r.mu.Lock()
	first := r.readOnly == nil
	if first {
		r.readOnly = &ReadOnly{InRecovery: srv.InRecovery, Reason: srv.String(), Since: r.cfg.Now()}
		close(r.changed)
		r.changed = make(chan struct{})
	}
	r.mu.Unlock()
	if first {
		r.log.Warn().Str("lane", lane).Str("server", srv.String()).Bool("in_recovery", srv.InRecovery).
			Msg("the server is read-only: lanes wait until it takes writes (a promotion); connect with target_session_attrs=read-write to reach the primary")
	}
	return true
}

// recheckReadOnly runs on the listener's connection at every check and poll while the server
// is known read-only: once it takes writes, the lanes are tried at once.
func (r *Runtime) recheckReadOnly(ctx context.Context, conn *pgx.Conn) error {
	r.mu.Lock()
	known := r.readOnly != nil
	r.mu.Unlock()
	if !known {
		return nil
	}
	srv, err := pgconnect.ReadServer(ctx, conn)
	if err != nil {
		return err
	}
	if !srv.ReadOnly && r.clearReadOnly() {
		r.databaseBack()
	}
	return nil
}

// clearReadOnly forgets that the server was read-only, logging it, and reports whether it was.
func (r *Runtime) clearReadOnly() bool {
	r.mu.Lock()
	was := r.readOnly
	r.readOnly = nil
	if was != nil {
		close(r.changed)
		r.changed = make(chan struct{})
	}
	r.mu.Unlock()
	if was != nil {
		r.log.Info().Float64("read_only_s", r.cfg.Now().Sub(was.Since).Seconds()).Msg("the server takes writes again; applying the lanes")
	}
	return was != nil
}

// failed records this replica's own permanent failure in its state at once, without waiting for
// the notification, so the lane is not retried in the meantime.
func (r *Runtime) failed(l migrator.LaneInfo, me *migrator.MigrationError) {
	r.modify(l.Name, "failed", noRead, func(st *migrator.LaneStatus) {
		// A failure of version N proves N-1 applied, and this replica held the lock until now.
		st.Version = max(st.Version, me.Version-1)
		st.Locked = false
		st.State, st.Error = migrator.StateFailed, me.Error()
		st.Failure = &migrator.Failure{Version: me.Version, File: me.File, SQLState: me.SQLState, Statement: me.Statement, At: r.cfg.Now()}
		if int(me.Version) <= len(l.Migrations) {
			st.Failure.Checksum = l.Migrations[me.Version-1].Checksum
		}
	})
}

// backoff sleeps for the next capped exponential delay with full jitter, or less: see
// sleepUnlessBack. back is backSignal taken before the attempt that failed.
func (r *Runtime) backoff(ctx context.Context, retries *int, back <-chan struct{}) error {
	d := backoff.Exponential(*retries, r.cfg.RetryMin, r.cfg.RetryMax)
	*retries++
	return r.sleepUnlessBack(ctx, d, back, retries)
}

// backJitter spreads the replicas' retries once their listeners are back, so that they do not
// all reach the new primary in the same instant.
const backJitter = 500 * time.Millisecond

// sleepUnlessBack sleeps for d, or until back is closed: the listener connected again since the
// attempt that failed, so the database answers again (a restarted server, a new primary). The
// retry then comes after a random delay of at most backJitter, not after a backoff grown during
// the outage, and *retries starts again from 0.
func (r *Runtime) sleepUnlessBack(ctx context.Context, d time.Duration, back <-chan struct{}, retries *int) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	case <-back:
		*retries = 0
		return backoff.Sleep(ctx, backoff.Exponential(0, backJitter, backJitter))
	}
}

// backSignal returns the channel closed the next time the listener connects.
func (r *Runtime) backSignal() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.back
}

// databaseBack wakes the lanes waiting out a retry backoff: the listener has just connected.
func (r *Runtime) databaseBack() {
	r.mu.Lock()
	defer r.mu.Unlock()
	close(r.back)
	r.back = make(chan struct{})
}
