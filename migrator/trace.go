package migrator

import (
	"context"
	"time"
)

// Trace holds hooks that a Migrator calls as it works, for metrics and tracing. Like
// net/http/httptrace, a Trace travels in the context of a call (WithTrace), so one Migrator can
// serve callers that observe it differently. Every field is optional. Hooks are called
// synchronously on the goroutine applying the lane: they must return quickly, must not block,
// and must be safe for concurrent use when the Migrator applies several lanes at once.
type Trace struct {
	// LockWaited is called when Migrate stops waiting for a lane's lock that another session
	// held: acquired reports whether it got the lock (false: the holder finished the lane, or
	// the context ended). It is not called when the lock was free at the first try, nor by
	// TryMigrate, which does not wait.
	LockWaited func(lane string, waited time.Duration, acquired bool)
	// MigrationDone is called after each migration this call ran: err is nil when it
	// committed, the *MigrationError otherwise. took is measured on the monotonic clock.
	MigrationDone func(lane string, version int32, file string, took time.Duration, err error)
	// BatchDone is called after each committed batch of a batched migration, with what the
	// batch covered (keys for a keyed walk, 1 for a cursor walk) and how long it took.
	BatchDone func(lane string, version int32, rows int64, took time.Duration)
	// BatchThrottled is called each time a batched migration holds its next batch back
	// because the database's health asks for it (reason names the signal); once per batch
	// held back, however long.
	BatchThrottled func(lane string, version int32, reason string)
}

type traceKey struct{}

// WithTrace returns a context carrying t: Migrate and TryMigrate called with it
// report to t's hooks.
func WithTrace(ctx context.Context, t *Trace) context.Context {
	return context.WithValue(ctx, traceKey{}, t)
}

// traceFrom returns the context's Trace, or an empty one.
func traceFrom(ctx context.Context) *Trace {
	if t, ok := ctx.Value(traceKey{}).(*Trace); ok && t != nil {
		return t
	}
	return &Trace{}
}

func (t *Trace) lockWaited(lane string, since time.Time, acquired bool) {
	if t.LockWaited != nil {
		t.LockWaited(lane, time.Since(since), acquired)
	}
}

func (t *Trace) migrationDone(lane string, mig *Migration, since time.Time, err error) {
	if t.MigrationDone != nil {
		t.MigrationDone(lane, mig.Version, mig.Name, time.Since(since), err)
	}
}
