package app

// Hints: what a notification makes this replica do, at a bounded cost. Any role may NOTIFY the
// lanes' channel, so a payload only says what to re-read; a flood of them (spoofed or not) must
// not turn into a flood of reads or sessions. Each reaction (a lane's version read, a lane's
// lock check, the full status read) is rate-limited on its own: up to hintBurst at once, then
// one per Config.HintInterval. A hint that arrives over the limit is kept as pending and its
// reaction runs, once for all the hints it stands for, when the limit allows (the listener's
// Deferred hook): nothing real is lost, and without a flood nothing waits.

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

// hintBurst is how many reactions of one kind run at once before the rate limit applies: the
// few notifications of a real deploy (applied, applied, done) are each handled at once.
const hintBurst = 3

// The reactions a notification can call for.
const (
	reactRead   = iota // re-read one lane's version
	reactCheck         // see whether one lane's lock is free
	reactStatus        // read the full status (a failure or an operator's control)
)

type reaction struct {
	lane string // "" for reactStatus
	kind int
}

// bucket is a token bucket: hintBurst tokens, one more every interval.
type bucket struct {
	tokens float64
	at     time.Time
}

func (b *bucket) refill(now time.Time, every time.Duration) {
	if b.at.IsZero() {
		b.tokens = hintBurst
	} else if now.After(b.at) {
		b.tokens = min(hintBurst, b.tokens+float64(now.Sub(b.at))/float64(every))
	}
	b.at = now
}

// hints holds the pending reactions and their rate limits. It is used by the listener's
// goroutine only (its handler and Deferred hook), so it needs no lock.
type hints struct {
	every   time.Duration
	pending map[reaction]bool
	buckets map[reaction]*bucket
	now     func() time.Time
}

func newHints(every time.Duration) *hints {
	return &hints{every: every, pending: map[reaction]bool{}, buckets: map[reaction]*bucket{}, now: time.Now}
}

// reactTo records what a notification calls for. A payload that is not a lanes event, or names
// a lane this binary does not have, calls for nothing; a progress announcement is stored as
// the hint it is, without a query.
func (r *Runtime) reactTo(n *pgconn.Notification) {
	ev, err := wire.Parse(n.Payload)
	r.lastNotice.Store(noticeOf(ev, err, r.cfg.Now())) // the page's "last notification"
	if err != nil {
		r.log.Debug().Err(err).Int("bytes", len(n.Payload)).Msg("ignoring a notification that is not a lanes event")
		return
	}
	r.log.Debug().Str("lane", ev.Lane).Int32("version", ev.Version).Msg("notification received")
	if _, known := r.state[ev.Lane]; !known { // the map itself never changes after New
		return // a lane of another binary: this replica's status does not show it
	}
	switch {
	case ev.Progress != nil:
		r.setProgress(ev)
	case ev.State == wire.Failed || ev.Control != "":
		// A failure or an operator's control: the full status says what is true.
		r.hints.pending[reaction{kind: reactStatus}] = true
	case (ev.State == wire.Applied || ev.State == wire.Done) && r.fromHolder(ev.Lane, n.PID):
		// Sent by the backend that holds the lane's lock (PostgreSQL names the sending
		// backend; no client can forge that): the version it announces is what it committed,
		// no read needed.
		r.trust(ev.Lane, ev.Version)
	default:
		// A migration committed: only that lane's version changed.
		r.hints.pending[reaction{lane: ev.Lane, kind: reactRead}] = true
		if ev.State == wire.Released {
			// The applying session stopped and released the lock: see whether it is free, and
			// if so, wake the waiting goroutine to take the lane over. A spoofed hint costs
			// that one statement on the listener's connection, not a session.
			r.hints.pending[reaction{lane: ev.Lane, kind: reactCheck}] = true
		}
	}
}

// react runs the pending reactions the rate limits allow, on the listener's connection, and
// returns when the next pending one may run (zero when none is pending). It is the listener's
// Deferred hook.
func (r *Runtime) react(ctx context.Context, conn *pgx.Conn) (time.Time, error) {
	h := r.hints
	now := h.now()
	var next time.Time
	// Status first: it covers every lane's version and lock.
	order := make([]reaction, 0, len(h.pending))
	if h.pending[reaction{kind: reactStatus}] {
		order = append(order, reaction{kind: reactStatus})
	}
	for _, l := range r.lanes {
		for _, kind := range []int{reactRead, reactCheck} {
			if x := (reaction{lane: l.Name, kind: kind}); h.pending[x] {
				order = append(order, x)
			}
		}
	}
	for _, x := range order {
		if !h.pending[x] {
			continue // done by the status read
		}
		b := h.buckets[x]
		if b == nil {
			b = &bucket{}
			h.buckets[x] = b
		}
		b.refill(now, h.every)
		if b.tokens < 1 {
			at := b.at.Add(time.Duration((1 - b.tokens) * float64(h.every)))
			if next.IsZero() || at.Before(next) {
				next = at
			}
			continue
		}
		b.tokens--
		delete(h.pending, x)
		if err := r.run(ctx, conn, x); err != nil {
			h.pending[x] = true // try again on the next connection
			return time.Time{}, err
		}
	}
	return next, nil
}

// run makes one reaction's read.
func (r *Runtime) run(ctx context.Context, conn *pgx.Conn, x reaction) error {
	const via = "notification"
	switch x.kind {
	case reactStatus:
		return r.readStatus(ctx, conn, via)
	case reactCheck:
		free, err := r.lockFree(ctx, conn, x.lane)
		if err != nil {
			return err
		}
		if free {
			r.setLocked(x.lane, false, via)
		}
	case reactRead:
		// One short statement, rather than the full status, whose pg_locks scans cost
		// O(max_connections) and run on every replica at the same moment.
		mark := r.readMark()
		v, err := r.m.Version(ctx, conn, x.lane)
		if err != nil {
			return err
		}
		if r.movedBack(x.lane, v, mark) {
			// The lane moved backwards: read its full state (lock, failure).
			return r.readStatus(ctx, conn, via)
		}
		r.modify(x.lane, via, mark, func(st *migrator.LaneStatus) { raise(st, v) })
	}
	return nil
}

// fromHolder reports whether pid is the backend this replica last saw holding the lane's lock.
func (r *Runtime) fromHolder(lane string, pid uint32) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	h := r.state[lane].holderPID
	return h != 0 && uint32(h) == pid
}

// trust records a version announced by the lane's lock holder, as a read of it would.
func (r *Runtime) trust(lane string, v int32) {
	r.modify(lane, "notification", noRead, func(st *migrator.LaneStatus) { raise(st, v) })
}

// raise sets the lane's version to v if that is higher, with what follows from it: a failure
// of an earlier version is over, and the lane is done (or ahead) at its latest version.
func raise(st *migrator.LaneStatus, v int32) {
	if v <= st.Version {
		return
	}
	st.Version = v
	if st.Failure != nil && st.Failure.Version <= v {
		st.Failure, st.Error = nil, ""
	}
	switch {
	case v > st.Latest:
		st.State, st.Locked = migrator.StateAhead, false
	case v == st.Latest:
		st.State, st.Locked = migrator.StateDone, false
	}
}

// readStatus reads the full status, which settles every pending reaction.
func (r *Runtime) readStatus(ctx context.Context, conn *pgx.Conn, via string) error {
	mark := r.readMark()
	lanes, err := r.m.Status(ctx, conn)
	if err != nil {
		return err
	}
	r.update(lanes, via, mark)
	clear(r.hints.pending)
	return nil
}
