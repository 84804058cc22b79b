package app

// The listener's lifetime: a replica whose lanes are all done (or ahead) has nothing to learn,
// so it closes its LISTEN connection and holds no connection at all between deploys. It
// connects again while something needs it: a lane not done (a regression found by a status
// read), a WaitVersion for a version not reached, a Listen caller (a live page), or
// Config.KeepListening.

import (
	"context"
	"math/rand/v2"
	"time"

	"github.com/multilanes/lanes/internal/backoff"
	"github.com/multilanes/lanes/internal/connerr"
	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/notifier"
)

// DeliveryIdle is ReplicaView.Listener while the replica keeps no listener connection: every
// lane is done and nothing waits (see Config.KeepListening).
const DeliveryIdle notifier.Delivery = "idle"

// lis returns the current listener.
func (r *Runtime) lis() *notifier.Listener {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.listener
}

// delivery returns how notifications reach this replica now: the listener's mode, or
// DeliveryIdle while it keeps none.
func (r *Runtime) delivery() notifier.Delivery {
	r.mu.Lock()
	l, off := r.listener, r.listenerOff
	r.mu.Unlock()
	if off {
		return DeliveryIdle
	}
	return l.Delivery()
}

// listenerStats returns the counters of every listener this replica ran; Connects counts only
// reconnects beyond each listener's first connection, plus one.
func (r *Runtime) listenerStats() notifier.Stats {
	r.mu.Lock()
	l, s := r.listener, r.pastStats
	r.mu.Unlock()
	cur := l.Stats()
	s.Connects += cur.Connects
	s.Notifications += cur.Notifications
	s.Syncs += cur.Syncs
	s.Polls += cur.Polls
	return s
}

// Listen keeps the replica's listener connected, even once every lane is done, until release
// is called: for a caller that follows every change as it happens (a live page). release is
// idempotent. It is safe for concurrent use.
func (r *Runtime) Listen() (release func()) {
	r.hold(1)
	released := false
	return func() {
		r.mu.Lock()
		was := released
		released = true
		r.mu.Unlock()
		if !was {
			r.hold(-1)
		}
	}
}

// hold adds d to the number of callers that need the listener, and wakes the keeper.
func (r *Runtime) hold(d int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.holds += d
	close(r.changed)
	r.changed = make(chan struct{})
}

// needListenerLocked reports whether the replica needs its listener now. r.mu is held.
func (r *Runtime) needListenerLocked() bool {
	if r.cfg.KeepListening || r.holds > 0 {
		return true
	}
	for _, l := range r.lanes {
		if !r.state[l.Name].status.Done() {
			return true
		}
	}
	return false
}

// keepListener runs in the background once the replica is ready, until ctx is done: it stops
// the listener when nothing needs it and starts a new one when something does.
func (r *Runtime) keepListener(ctx context.Context) {
	for {
		r.mu.Lock()
		need, off, changed, cur := r.needListenerLocked(), r.listenerOff, r.changed, r.listener
		r.mu.Unlock()
		switch {
		case !need && !off:
			// Linger first, a random while: a fleet learns a completion in the same instant,
			// and a thousand sessions ending at once on the server delay the notification's
			// delivery to the replicas that have not read it yet (BENCHMARKS.md section 12).
			if !r.linger(ctx) {
				return
			}
			r.mu.Lock()
			need = r.needListenerLocked()
			r.mu.Unlock()
			if need {
				continue
			}
			cur.Stop()
			r.mu.Lock()
			r.listenerOff = true
			r.mu.Unlock()
			r.log.Info().Msg("every lane done: listener connection closed until something waits")
		case need && off:
			if !r.restartListener(ctx) {
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

// linger waits a random time between half of Config.IdleAfter and IdleAfter while nothing needs
// the listener; it returns early when something does (true) and false when ctx is done.
func (r *Runtime) linger(ctx context.Context) bool {
	d := r.cfg.IdleAfter/2 + time.Duration(rand.Int64N(int64(r.cfg.IdleAfter/2)+1))
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		r.mu.Lock()
		need, changed := r.needListenerLocked(), r.changed
		r.mu.Unlock()
		if need {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		case <-changed:
		}
	}
}

// restartListener starts a new listener, trying again with backoff while the database is not
// usable, until it runs or ctx is done (false).
func (r *Runtime) restartListener(ctx context.Context) bool {
	r.log.Info().Msg("connecting the listener again: something waits")
	seen := ""
	for attempt := 0; ; attempt++ {
		l, err := r.newListener()
		if err == nil {
			if err = l.Start(ctx); err == nil {
				r.mu.Lock()
				if r.closed || ctx.Err() != nil {
					r.mu.Unlock()
					l.Stop()
					return false
				}
				old := r.listener
				r.listener, r.listenerOff = l, false
				r.mu.Unlock()
				past := old.Stats()
				r.mu.Lock()
				r.pastStats.Connects += past.Connects - 1 // its first connection is no reconnect
				r.pastStats.Notifications += past.Notifications
				r.pastStats.Syncs += past.Syncs
				r.pastStats.Polls += past.Polls
				r.mu.Unlock()
				return true
			}
		}
		if ctx.Err() != nil {
			return false
		}
		if msg := err.Error(); msg != seen {
			seen = msg
			r.log.Warn().Err(connerr.Compact(err)).Msg("cannot connect the listener again; retrying with backoff")
		}
		if backoff.Sleep(ctx, backoff.Exponential(attempt, 100*time.Millisecond, 5*time.Second)) != nil {
			return false
		}
	}
}

// newListener returns a new, unstarted listener with the Runtime's settings.
func (r *Runtime) newListener() (*notifier.Listener, error) {
	return notifier.New(engine.SessionConnConfig(r.m), r.ncfg, r.sync)
}
