package app

// Takeover: how a waiting replica learns that the lane's holder is gone (the successor's lock
// check, the holder's "released" announcement) and when it tries the lock again, at a cost that
// does not grow with the number of waiting replicas.
//
// Of all the replicas waiting for a lane, one is its designated successor, chosen through the
// database: the one whose listener connection holds the lane's successor key (a session-level
// advisory lock taken with pg_try_advisory_lock only, never a blocking wait). The successor
// checks the lane's lock every SuccessorInterval and keeps a connection open to take the lane
// over without a connect. The other waiters only try the successor key, each every
// FleetInterval × the number of waiters, so that the fleet as a whole tries about once per
// FleetInterval, whatever its size: when the successor dies (its connection closes and the
// server frees its key) one of them takes its place within a few FleetIntervals. Every waiter
// holds the lane's waiters key in shared mode on its listener connection, which is how the
// waiters count themselves (pg_locks) in the statement that tries the successor key.

import (
	"context"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/backoff"
	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

// watch is what the listener's connection holds for one lane: the waiters key (shared) and
// perhaps the successor key. It is used by the listener's goroutine only, and forgotten on
// every (re)connect, when the server has released both keys with the old session.
type watch struct {
	joined    bool      // holds the waiters key, shared
	successor bool      // holds the successor key
	nextTry   time.Time // when a waiter that is not the successor tries the successor key again
}

// takeoverKeys returns the lane's successor key and waiters key, derived from the key every
// applier of the lane holds (so that every replica with the same lane configuration agrees), with
// no query.
func (r *Runtime) takeoverKeys(lane string) (successor, waiters int64, err error) {
	key, err := engine.ApplierLockKey(r.m, lane)
	if err != nil {
		return 0, 0, err
	}
	derive := func(what string) int64 {
		h := fnv.New64a()
		fmt.Fprintf(h, "multi-lanes:%s:%d", what, key)
		return int64(h.Sum64())
	}
	return derive("successor"), derive("waiters"), nil
}

// check runs on the listener's connection in place of its ping, at the interval nextCheck
// returns. For each background lane this replica waits for, it joins the lane's waiters and,
// as the successor, asks whether the lane's lock is free (taking and releasing it at once: one
// statement); if so it marks the lane unlocked, which wakes the waiting goroutine to take the
// lane over. A waiter that is not the successor tries the successor key when its turn comes.
// Keys of lanes this replica no longer waits for are released. With nothing to do it is a
// plain ping.
func (r *Runtime) check(ctx context.Context, conn *pgx.Conn) error {
	if err := r.recheckReadOnly(ctx, conn); err != nil {
		return err
	}
	waiting := map[string]bool{}
	r.mu.Lock()
	for _, l := range r.lanes {
		if s := r.state[l.Name]; s.role == "waiting" && !s.status.Done() {
			waiting[l.Name] = true
		}
	}
	r.mu.Unlock()
	ran := false
	for _, l := range r.lanes {
		w := r.watches[l.Name]
		if w == nil || waiting[l.Name] || !(w.joined || w.successor) {
			continue
		}
		if err := r.leave(ctx, conn, l.Name, w); err != nil {
			return err
		}
		ran = true
	}
	now := time.Now()
	for _, l := range r.lanes {
		if !waiting[l.Name] {
			continue
		}
		w := r.watches[l.Name]
		if w == nil {
			w = &watch{}
			r.watches[l.Name] = w
		}
		if !w.successor && w.joined && now.Before(w.nextTry) {
			continue
		}
		ran = true
		if !w.successor {
			if err := r.trySuccessor(ctx, conn, l.Name, w); err != nil {
				return err
			}
			if !w.successor {
				continue
			}
		}
		free, err := r.lockFree(ctx, conn, l.Name)
		if err != nil {
			return err
		}
		if free {
			r.setLocked(l.Name, false, "check")
		}
	}
	if !ran {
		return conn.Ping(ctx)
	}
	return nil
}

// trySuccessor joins the lane's waiters (once per connection) and tries the successor key, in
// one statement that also counts the waiters; a waiter that stays a mere waiter tries again
// after FleetInterval × that count (at least the listener's ping interval), jittered.
func (r *Runtime) trySuccessor(ctx context.Context, conn *pgx.Conn, lane string, w *watch) error {
	succ, waiters, err := r.takeoverKeys(lane)
	if err != nil {
		return err
	}
	var got bool
	var n int64
	err = conn.QueryRow(ctx, `select case when $3 then true else pg_try_advisory_lock_shared($2) end,
  pg_try_advisory_lock($1),
  (select count(*) from pg_locks where locktype = 'advisory' and granted and objsubid = 1
     and database = (select oid from pg_database where datname = current_database())
     and classid = $4::int8::oid and objid = $5::int8::oid)`,
		succ, waiters, w.joined, int64(uint64(waiters)>>32), int64(uint64(waiters)&0xffffffff)).Scan(&w.joined, &got, &n)
	if err != nil {
		return fmt.Errorf("lane %q: try the successor key: %w", lane, err)
	}
	r.setWaiters(lane, int(n))
	if got {
		w.successor = true
		r.setSuccessor(lane, true)
		r.log.Debug().Str("lane", lane).Int64("waiters", n).Msg("this replica is the lane's designated successor")
		return nil
	}
	every := time.Duration(max(n, 1)) * r.cfg.FleetInterval
	// Uniform over [0.5, 1.5] × every: the waiters' tries spread evenly over time.
	w.nextTry = time.Now().Add(every/2 + time.Duration(rand.Int64N(int64(every)+1)))
	return nil
}

// leave releases the keys the listener's connection holds for a lane this replica no longer
// waits for.
func (r *Runtime) leave(ctx context.Context, conn *pgx.Conn, lane string, w *watch) error {
	succ, waiters, err := r.takeoverKeys(lane)
	if err != nil {
		return err
	}
	_, err = conn.Exec(ctx, `select case when $3 then pg_advisory_unlock_shared($2) end, case when $4 then pg_advisory_unlock($1) end`,
		succ, waiters, w.joined, w.successor)
	if err != nil {
		return fmt.Errorf("lane %q: release the successor key: %w", lane, err)
	}
	*w = watch{}
	r.setSuccessor(lane, false)
	return nil
}

// forgetWatches is called on every (re)connect of the listener: the old session's keys died
// with it.
func (r *Runtime) forgetWatches() {
	for lane, w := range r.watches {
		*w = watch{}
		r.setSuccessor(lane, false)
	}
}

// nextCheck is the listener's CheckInterval: SuccessorInterval while this replica is a lane's
// successor, otherwise until a waiter's next try of a successor key (the listener caps it at
// its ping interval).
func (r *Runtime) nextCheck() time.Duration {
	var d time.Duration
	now := time.Now()
	for _, w := range r.watches {
		switch {
		case w.successor:
			return r.cfg.SuccessorInterval
		case w.joined:
			if until := w.nextTry.Sub(now); d == 0 || until < d {
				d = max(until, time.Millisecond)
			}
		}
	}
	return d
}

// lockFree reports whether nothing holds the lane (its session lock or its lease): one
// statement, which takes nothing. The same statement finds a holder gone silent (its heartbeat
// expired, see migrator.Config.SilenceBound), whose session it then ends: the successor is the
// one replica of the fleet that does so, and the lock is found free at its next check.
func (r *Runtime) lockFree(ctx context.Context, conn *pgx.Conn, lane string) (bool, error) {
	return engine.LaneFree(ctx, r.m, conn, lane)
}

// setLocked records whether the lane's lock was seen held. A lock seen free forgets its holder.
func (r *Runtime) setLocked(lane string, locked bool, via string) {
	if !locked {
		r.setHolder(lane, 0)
	}
	r.modify(lane, via, noRead, func(st *migrator.LaneStatus) { st.Locked = locked })
}

// readHolder reads, once when this replica begins waiting for the lane, which backend holds
// the lane's lock: its notifications are then trusted without a read (see reactTo). A failed
// read only leaves the holder unknown.
func (r *Runtime) readHolder(ctx context.Context, conn *pgx.Conn, lane string) {
	holders, err := r.m.LockHolders(ctx, conn)
	if err != nil {
		r.log.Debug().Err(err).Str("lane", lane).Msg("cannot read the lane's lock holder; its notifications will be verified")
		r.setHolder(lane, 0)
		return
	}
	r.setHolder(lane, holders[lane].PID)
}

// setHolder records the backend holding the lane's lock (0: unknown).
func (r *Runtime) setHolder(lane string, pid int32) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.state[lane].holderPID = pid
}

// setSuccessor records whether this replica is the lane's designated successor, and wakes the
// lane's waiting goroutine when that changes.
func (r *Runtime) setSuccessor(lane string, on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.state[lane]
	if s.successor == on {
		return
	}
	s.successor = on
	close(r.changed)
	r.changed = make(chan struct{})
}

// setWaiters records how many replicas wait for the lane, as last counted.
func (r *Runtime) setWaiters(lane string, n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.state[lane].waiters = n
}

// waitForHolder waits while another session holds the lane's lock: until the lane is done or
// its lock seen free, or ctx is done. As the lane's successor this replica gives up waiting
// after TakeoverInterval (jittered), in case a change was missed; a mere waiter, while its
// listener listens, waits TakeoverInterval × the number of waiters, so that this backstop too
// costs the fleet about one try per TakeoverInterval.
func (r *Runtime) waitForHolder(ctx context.Context, lane string) error {
	r.lis().CheckSoon() // join the lane's waiters now
	began := time.Now()
	jitter := backoff.Jitter(time.Second) - time.Second // the same ±20 % of the backstop throughout
	for {
		r.mu.Lock()
		s := r.state[lane]
		st, changed, successor, waiters := s.status, r.changed, s.successor, s.waiters
		r.mu.Unlock()
		if !st.Locked || st.Done() {
			return nil
		}
		// The backstop is worked out again on every wake-up: the count of waiters comes
		// with this replica's first try of the successor key, after the wait began.
		backstop := r.cfg.TakeoverInterval
		if !successor && r.delivery() == notifier.DeliveryListening {
			backstop *= time.Duration(max(waiters, 1))
		}
		backstop += time.Duration(float64(backstop) * jitter.Seconds())
		left := backstop - time.Since(began)
		if left <= 0 {
			return nil
		}
		t := time.NewTimer(left)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		case <-changed:
			t.Stop()
		}
	}
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

// closeQuietly closes a connection nothing is pending on.
func closeQuietly(c *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = c.Close(ctx) // nothing is pending on it: its close error changes nothing
}
