package app

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/internal/backoff"
	"github.com/multilanes/lanes/internal/connerr"
	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/lanestate"
	"github.com/multilanes/lanes/internal/pgconnect"
	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

// Config tunes a Runtime. The zero value is valid.
type Config struct {
	// Logger receives the runtime's events. Default: no logging.
	Logger zerolog.Logger
	// Notifier tunes the LISTEN connection. Its Channel is always the Migrator's, its Logger
	// is Logger and its Deferred is the Runtime's own.
	Notifier notifier.Config
	// HintInterval rate-limits what notifications make this replica read, so that a flood of
	// them (any role may NOTIFY) costs a bounded rate of statements and no session: per lane,
	// the version read and the lock check a hint calls for each run at once up to 3 times in
	// a row, then at most once per HintInterval (likewise the full status read a failure or
	// an operator's control calls for). A hint over the limit is not lost: its read runs when
	// the limit allows, once for all the hints that arrived meanwhile. Default: 100ms.
	HintInterval time.Duration
	// TakeoverInterval bounds how long the designated successor of a background lane (see
	// SuccessorInterval) goes without trying the lane's lock itself (±20 % jitter), in case a
	// change was missed; the other waiting replicas wait TakeoverInterval × the number of
	// waiting replicas, so that the fleet as a whole tries about once per TakeoverInterval. The
	// usual way a waiting replica notices that the applying replica died is quicker and cheaper:
	// the successor's check sees the lane's lock free. Default: 1m.
	TakeoverInterval time.Duration
	// SuccessorInterval is how often the designated successor of a background lane checks, on
	// its listener's connection, whether the lane's lock is free (one statement), so that it
	// takes the lane over within about client_connection_check_interval + SuccessorInterval
	// after the applying replica dies. Of all the replicas waiting for a lane only one, chosen
	// through the database (an advisory key on its listener's connection), is the successor:
	// the cost does not grow with the number of replicas. Default: 1s.
	SuccessorInterval time.Duration
	// FleetInterval paces the waiting replicas that are not a lane's successor: each tries to
	// become the successor every FleetInterval × the number of waiting replicas (at least every
	// Notifier.PingInterval), ±50 %, so that the fleet together tries about once per
	// FleetInterval and a successor that died is replaced within a few FleetIntervals, whatever
	// the number of replicas. Default: 4s.
	FleetInterval time.Duration
	// RetryMin and RetryMax bound the backoff between retries of a migration that failed with
	// a transient error (serialization failure, deadlock, lock timeout, lost connection).
	// Defaults: 1s and 1m. A lane waiting out its backoff is tried as soon as the listener has
	// connected again (the database is back: a restart, a failover), after a random delay of at
	// most 0.5 s, and its backoff starts again from RetryMin.
	RetryMin, RetryMax time.Duration
	// WaitForDatabase makes Start keep trying, with backoff and until its context is done, while
	// no usable database answers (no server, a server starting up, a failover in progress, a
	// read-only server, too many clients, a server too slow to answer the listener's connect
	// within Notifier.ConnectTimeout), instead of returning the error: what a service under an
	// orchestrator wants (lanes serve sets it). Permanent errors (a refused password, a failed
	// migration) are returned at once either way. Default: false.
	WaitForDatabase bool
	// KeepListening keeps the listener's connection open once every lane is done. By default a
	// replica whose lanes are all done (or ahead) closes it and holds no connection between
	// deploys; it connects again while something needs it: a WaitVersion for a version not
	// reached, a Listen caller, a lane no longer done (a status read found its version moved
	// backwards). Meanwhile a lane moving backwards is noticed only by a status read (/lanes).
	// Default: false.
	KeepListening bool
	// IdleAfter is how long the listener's connection stays open once every lane is done:
	// a random time between IdleAfter/2 and IdleAfter, so that a fleet that learns a
	// completion together does not end all its sessions in the same instant. Default: 10s.
	IdleAfter time.Duration
	// Now returns the time recorded when this replica learns a lane is done. Default: time.Now.
	Now func() time.Time
	// CloseTimeout bounds how long Close waits for what it cancels: a Start still applying the
	// blocking lanes and the background lanes' goroutines. A migration that honours its context
	// stops at once (its transaction rolls back, its lane lock is released); one that ignores
	// it (a Go migration in a loop) is left behind after CloseTimeout, and Close returns an
	// error saying so, so that a SIGTERM never hangs. Default: 15s.
	CloseTimeout time.Duration
}

// ErrClosed is returned (wrapped) by Start when Close ran before or during it.
var ErrClosed = errors.New("app: runtime closed")

// Runtime is what a service embeds: Start applies the blocking lanes and returns once the
// replica may serve; background lanes are then applied by whichever replica wins each lane's
// lock, while every replica learns of their progress through one LISTEN connection. A Runtime's
// methods are safe for concurrent use.
type Runtime struct {
	m     *migrator.Migrator
	cfg   Config
	log   zerolog.Logger
	lanes []migrator.LaneInfo

	listener *notifier.Listener // guarded by mu: replaced when the listener is started again
	ncfg     notifier.Config    // the listener's settings
	metrics  *metrics
	trace    *migrator.Trace // feeds metrics from the migrator's calls
	hints    *hints          // the listener's pending reactions to notifications
	// lastNotice is the last notification received (an atomic: set for every notification,
	// without the mutex).
	lastNotice atomic.Pointer[Notice]
	watches    map[string]*watch // the takeover keys the listener's connection holds, by lane (listener goroutine only)
	events     *events           // the page's live feed

	mu          sync.Mutex
	state       map[string]*laneState
	changed     chan struct{} // closed and replaced on every state change
	ready       bool
	started     bool
	closed      bool
	startCancel context.CancelFunc // cancels a Start in progress
	starting    chan struct{}      // closed when Start returns
	cancel      context.CancelFunc // cancels the background goroutine
	wg          sync.WaitGroup
	closeDone   chan struct{} // closed when the first Close returns
	closeErr    error
	seq         uint64 // counts the raises of lane versions, to tell stale reads from regressions
	// back is closed and replaced each time the listener connects: the database answers
	// again, so a lane waiting out its retry backoff tries at once (see backoff).
	back chan struct{}
	// readOnly is the server found refusing this replica's writes; nil while it takes them.
	readOnly    *ReadOnly
	listenerOff bool           // the listener was stopped because nothing needs it (listener.go)
	holds       int            // callers that need the listener: Listen, WaitVersion
	pastStats   notifier.Stats // the counters of the listeners stopped before this one
}

type laneState struct {
	status migrator.LaneStatus
	done   chan struct{} // closed once status.Done()
	role   string        // what this replica does with the lane now: applying, waiting or ""
	via    string        // how this replica learned the lane was done
	doneAt time.Time     // when it learned it
	// migrating is set while this replica's own Migrate call on the lane runs: its listener can
	// hear the commit before Migrate has logged the file's "OK" line, so "lane done" waits.
	migrating    bool
	doneLogLater bool
	raisedAt     uint64      // r.seq when the version was last raised
	regressed    *Regression // the last time the version was seen moving backwards
	successor    bool        // this replica is the lane's designated successor (see takeover.go)
	holderPID    int32       // the backend holding the lane's lock when this replica began waiting; 0: unknown
	waiters      int         // replicas waiting for the lane, as last counted by this one
}

// Regression is a lane version seen moving backwards: a database restored from a backup, a
// failover to a standby that had not replayed the last migrations, a manual edit. The replica
// logs it as an error, the lane counts as not done again (Done hands out a new channel), and
// the lane is applied again up to its latest version by whichever replica wins its lock.
type Regression struct {
	From int32     `json:"from"` // the version this replica knew
	To   int32     `json:"to"`   // the lower version read from the database
	At   time.Time `json:"at"`   // when this replica read it
	Via  string    `json:"via"`  // the read that found it: connect, poll, notification, status, applied, check
}

// New returns a Runtime for the Migrator's lanes. It does not connect. Call Close to release
// it, whether or not Start was called.
func New(m *migrator.Migrator, cfg Config) (*Runtime, error) {
	if m == nil {
		return nil, errors.New("app: nil migrator")
	}
	if cfg.TakeoverInterval <= 0 {
		cfg.TakeoverInterval = time.Minute
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.CloseTimeout <= 0 {
		cfg.CloseTimeout = 15 * time.Second
	}
	if cfg.HintInterval <= 0 {
		cfg.HintInterval = 100 * time.Millisecond
	}
	if cfg.IdleAfter <= 0 {
		cfg.IdleAfter = 10 * time.Second
	}
	if cfg.SuccessorInterval <= 0 {
		cfg.SuccessorInterval = time.Second
	}
	if cfg.FleetInterval <= 0 {
		cfg.FleetInterval = 4 * time.Second
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(time.Minute, cfg.RetryMin)
	}
	r := &Runtime{m: m, cfg: cfg, log: cfg.Logger, lanes: m.Lanes(), state: map[string]*laneState{}, changed: make(chan struct{}), back: make(chan struct{}), closeDone: make(chan struct{})}
	for _, l := range r.lanes {
		r.state[l.Name] = &laneState{
			status: migrator.LaneStatus{Name: l.Name, Mode: l.Mode.String(), VersionTable: l.VersionTable, Latest: l.Latest, State: migrator.StatePending},
			done:   make(chan struct{}),
		}
	}
	r.hints = newHints(cfg.HintInterval)
	r.watches = map[string]*watch{}
	r.events = newEvents()
	r.metrics = newMetrics(r)
	r.trace = r.metrics.trace()
	ncfg := cfg.Notifier
	ncfg.Channel = m.Channel()
	ncfg.Logger = cfg.Logger.With().Str("component", "notifier").Logger()
	if ncfg.Check == nil {
		ncfg.Check = r.check
		ncfg.CheckInterval = r.nextCheck
	}
	ncfg.Deferred = r.react
	if ncfg.BeforeConnect == nil {
		ncfg.BeforeConnect = engine.BeforeConnect(m)
	}
	r.ncfg = ncfg
	l, err := r.newListener()
	if err != nil {
		return nil, fmt.Errorf("app: %w", err)
	}
	r.listener = l
	return r, nil
}

// Start makes the replica ready: it LISTENs and reads the lanes' state first (so no completion
// can slip between the read and the LISTEN), then applies the blocking lanes in order, waiting
// for another replica that holds a lane's lock; then it starts applying the background lanes
// in goroutines the Runtime owns and returns. It returns an error, and leaves nothing running,
// when the database cannot be reached or a blocking lane fails. Close during Start cancels it:
// Start then returns an error wrapping ErrClosed. Start may be called once.
func (r *Runtime) Start(ctx context.Context) error {
	r.mu.Lock()
	switch {
	case r.closed:
		r.mu.Unlock()
		return fmt.Errorf("app: start: %w", ErrClosed)
	case r.started:
		r.mu.Unlock()
		return errors.New("app: Start called twice")
	}
	r.started = true
	sctx, scancel := context.WithCancel(ctx)
	starting := make(chan struct{})
	r.startCancel, r.starting = scancel, starting
	r.mu.Unlock()
	defer close(starting)
	defer scancel()

	err := r.start(sctx, ctx)
	if err != nil {
		r.lis().Stop()
		if r.isClosed() {
			return fmt.Errorf("app: start interrupted by Close: %w", errors.Join(ErrClosed, err))
		}
		return err
	}
	return nil
}

// start is Start's work on sctx, which Close cancels; ctx is the caller's, whose values the
// background goroutine keeps.
func (r *Runtime) start(sctx, ctx context.Context) error {
	if err := r.untilUsable(sctx, func(ctx context.Context) error { return attemptTimedOut(ctx, r.lis().Start(ctx)) }); err != nil {
		return fmt.Errorf("app: %w", err)
	}
	for _, l := range r.lanes {
		if l.Mode != migrator.Blocking {
			continue
		}
		if st, _ := r.laneStatus(l.Name); st.Done() {
			continue // the listener's first read, made after LISTEN, found it applied
		}
		r.setMigrating(l.Name, true)
		mark := r.readMark()
		var res migrator.Result
		err := r.untilUsable(sctx, func(ctx context.Context) error {
			var err error
			res, err = r.m.Migrate(migrator.WithTrace(ctx, r.trace), l.Name)
			return err
		})
		r.setMigrating(l.Name, false)
		if err != nil {
			return fmt.Errorf("app: blocking %w", err)
		}
		r.applied(res, mark)
	}
	bctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	r.mu.Lock()
	if r.closed { // Close ran while the blocking lanes were applied: start nothing
		r.mu.Unlock()
		cancel()
		return errors.New("app: closed while starting")
	}
	r.ready, r.cancel = true, cancel
	r.wg.Add(2)
	r.mu.Unlock()
	r.log.Info().Msg("blocking lanes applied; replica ready")
	go func() {
		defer r.wg.Done()
		r.runBackground(bctx)
	}()
	go func() {
		defer r.wg.Done()
		r.keepListener(bctx)
	}()
	return nil
}

// untilUsable runs f once, or, with Config.WaitForDatabase, until it succeeds, fails with an
// error no retry mends, or ctx is done: while no usable database answers (a transient error such
// as a refused or lost connection, 57P01, 57P03 or 53300, a read-only server, 25006, or a
// listener start that ran out of its own time, timedOutError) it tries again with capped
// exponential backoff (100 ms to 5 s), saying so once per kind of failure and once when the
// database answers again.
func (r *Runtime) untilUsable(ctx context.Context, f func(context.Context) error) error {
	seen := map[string]bool{}
	var since time.Time
	for attempt := 0; ; attempt++ {
		back := r.backSignal()
		err := f(ctx)
		if err == nil {
			if !since.IsZero() {
				r.log.Info().Float64("outage_s", time.Since(since).Seconds()).Msg("database usable again")
			}
			return nil
		}
		var pgErr *pgconn.PgError
		readOnly := errors.As(err, &pgErr) && pgErr.Code == "25006"
		var slow *timedOutError
		if !r.cfg.WaitForDatabase || ctx.Err() != nil || !(migrator.IsTransient(err) || readOnly || errors.As(err, &slow)) {
			return err
		}
		if since.IsZero() {
			since = time.Now()
		}
		kind := "connection"
		switch {
		case pgErr != nil:
			kind = pgErr.Code
		case slow != nil:
			kind = "timeout"
		}
		if !seen[kind] {
			seen[kind] = true
			r.log.Warn().Err(connerr.Compact(err)).
				Msg("no usable database yet (no server, a failover, a read-only server, too many clients): not ready; retrying with backoff")
		}
		if err := r.sleepUnlessBack(ctx, backoff.Exponential(attempt, 100*time.Millisecond, 5*time.Second), back, &attempt); err != nil {
			return err
		}
	}
}

// timedOutError is an attempt that ran out of its own time while its caller's context was live:
// the listener's start (connect, LISTEN and probe within Notifier.ConnectTimeout) at a server, or on
// a machine, too loaded to answer in time. untilUsable tries it again like a refused connection.
type timedOutError struct{ err error }

func (e *timedOutError) Error() string { return e.err.Error() }
func (e *timedOutError) Unwrap() error { return e.err }

// attemptTimedOut marks err as a timedOutError when it is a deadline of the attempt's own and
// ctx, the caller's, is not done.
func attemptTimedOut(ctx context.Context, err error) error {
	if err != nil && ctx.Err() == nil && (errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err)) {
		return &timedOutError{err: err}
	}
	return err
}

func (r *Runtime) isClosed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

// Close stops the Runtime: it cancels a Start still applying the blocking lanes and the
// background lanes (a running migration is cancelled: its transaction rolls back and its lane
// lock is released), waits for them at most CloseTimeout, then stops the listener and closes
// the pool. It returns an error when something did not stop within CloseTimeout (a migration
// that ignores its context keeps running in its goroutine until it returns; nothing else is
// started after it). It is idempotent: later calls wait for the first and return its result.
func (r *Runtime) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		<-r.closeDone
		return r.closeErr
	}
	r.closed = true
	startCancel, starting, cancel := r.startCancel, r.starting, r.cancel
	r.mu.Unlock()
	defer close(r.closeDone)
	r.StopEvents()
	if startCancel != nil {
		startCancel()
	}
	if cancel != nil {
		cancel()
	}
	stopped := make(chan struct{})
	go func() {
		if starting != nil {
			<-starting
		}
		// Start has returned: the background goroutine is either started (and its cancel
		// set) or never will be.
		r.mu.Lock()
		cancel := r.cancel
		r.mu.Unlock()
		if cancel != nil {
			cancel()
		}
		r.wg.Wait()
		close(stopped)
	}()
	var errs []error
	t := time.NewTimer(r.cfg.CloseTimeout)
	defer t.Stop()
	select {
	case <-stopped:
	case <-t.C:
		what := "the background lanes"
		select {
		case <-starting:
		default:
			if starting != nil {
				what = "Start (a blocking lane's migration)"
			}
		}
		errs = append(errs, fmt.Errorf("app: close: %s still running after %s: a migration ignores its context; left behind", what, r.cfg.CloseTimeout))
		r.log.Error().Float64("close_timeout_s", r.cfg.CloseTimeout.Seconds()).Msgf("close: %s still running; giving up waiting", what)
	}
	r.lis().Stop()
	r.closeErr = errors.Join(errs...)
	return r.closeErr
}

// Ready reports whether the blocking lanes are applied.
func (r *Runtime) Ready() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ready
}

// IsDone reports whether every migration of the lane known to this binary is applied.
// It is false for an unknown lane.
func (r *Runtime) IsDone(lane string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.state[lane]
	return ok && s.status.Done()
}

// Done returns a channel closed once the lane is done, and an error wrapping
// migrator.ErrUnknownLane for a lane the Migrator does not have.
//
// Done means done as last read: if the lane's version later moves backwards (a restore, a
// failover to a lagging standby, a manual edit), a channel handed out before stays closed, but
// IsDone turns false and Done returns a new channel, closed once the lane is applied again
// (View shows the Regression). Code that must notice this calls Done again after each wake-up,
// or checks IsDone.
func (r *Runtime) Done(lane string) (<-chan struct{}, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.state[lane]
	if !ok {
		return nil, fmt.Errorf("app: lane %q: %w", lane, migrator.ErrUnknownLane)
	}
	return s.done, nil
}

// Version returns the lane's applied version as last read from the database.
func (r *Runtime) Version(lane string) int32 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if s, ok := r.state[lane]; ok {
		return s.status.Version
	}
	return 0
}

// FailedError is returned by WaitVersion when the migration it waits for failed with a permanent
// error and this binary has the same file: waiting longer will not help until a deploy fixes
// the migration.
type FailedError struct {
	Lane    string
	Failure migrator.Failure
	Err     string // the recorded error message
}

func (e *FailedError) Error() string {
	return fmt.Sprintf("lane %q: migration %s failed: %s", e.Lane, e.Failure.File, e.Err)
}

// WaitVersion blocks until the lane has reached version (or later), ctx is done, or a migration
// the wait depends on has failed permanently (a *FailedError). It returns at once when the
// version is already reached. It costs no query: it waits for the listener's updates (and
// connects the listener again meanwhile if the replica had closed it, every lane being done).
func (r *Runtime) WaitVersion(ctx context.Context, lane string, version int32) error {
	info, ok := r.m.Lane(lane)
	if !ok {
		return fmt.Errorf("app: lane %q: %w", lane, migrator.ErrUnknownLane)
	}
	held := false
	defer func() {
		if held {
			r.hold(-1)
		}
	}()
	for {
		r.mu.Lock()
		s := r.state[lane]
		st, changed := s.status, r.changed
		r.mu.Unlock()
		if st.Version >= version {
			return nil
		}
		if f := lanestate.BlockingFailure(info, st, version); f != nil {
			return &FailedError{Lane: lane, Failure: *f, Err: st.Error}
		}
		if !held {
			// The listener, closed once every lane is done, is needed again while this waits.
			held = true
			r.hold(1)
			continue
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("app: wait for lane %q version %d (at %d): %w", lane, version, st.Version, ctx.Err())
		case <-changed:
		}
	}
}

// Wait blocks until the lane is done (WaitVersion with the lane's latest version).
func (r *Runtime) Wait(ctx context.Context, lane string) error {
	info, _ := r.m.Lane(lane) // an unknown lane is reported by WaitVersion
	return r.WaitVersion(ctx, lane, info.Latest)
}

// Status is the lanes read fresh from the database, plus what this replica knows.
type Status struct {
	Lanes   []migrator.LaneStatus `json:"lanes"`
	Replica ReplicaView           `json:"replica"`
	// Server says whether the server takes writes, read with the lanes: "writable",
	// "read-only (in recovery: a hot standby)" or "read-only (default_transaction_read_only)";
	// empty when it could not be read.
	Server string `json:"server,omitempty"`
}

// ReplicaView is what one replica knows, from its own migrations and its listener.
type ReplicaView struct {
	Ready         bool              `json:"ready"`
	Listener      notifier.Delivery `json:"listener"`
	Notifications int               `json:"notifications"` // received by the listener
	Polls         int               `json:"polls"`         // state reads made because LISTEN was unavailable
	// LastNotification is the last notification the listener received; nil before the first.
	LastNotification *Notice `json:"last_notification,omitempty"`
	// ReadOnly is set while the server refuses this replica's writes (found when it tried to
	// apply a lane): lanes wait until it takes them. Nil otherwise.
	ReadOnly *ReadOnly   `json:"read_only,omitempty"`
	Lanes    []KnownLane `json:"lanes"`
}

// KnownLane is a lane as this replica last saw it.
type KnownLane struct {
	Name    string `json:"name"`
	Version int32  `json:"version"`
	Done    bool   `json:"done"`
	Role    string `json:"role,omitempty"` // applying: this replica holds the lane; waiting: another does
	// Successor is true while this replica is the waiting replica designated to take the
	// lane over (see Config.SuccessorInterval).
	Successor bool `json:"successor,omitempty"`
	// HolderPID is the server backend this replica saw holding the lane's lock when it began
	// waiting: its notifications about the lane are trusted without a read. 0 when unknown.
	HolderPID int32      `json:"holder_pid,omitempty"`
	Via       string     `json:"via,omitempty"`     // how it learned the lane was done: applied, notification, connect, poll, check
	DoneAt    *time.Time `json:"done_at,omitempty"` // when it learned it
	Paused    bool       `json:"paused"`            // an operator paused the lane
	// Regressed is the last time this replica saw the lane's version move backwards; nil if
	// never. It stays after the lane is applied again, as a record.
	Regressed *Regression `json:"regressed,omitempty"`
	// Progress is the running batched migration's progress, from the applier's announcements
	// (at most a second old while they arrive) or the last read; nil while none runs.
	Progress *migrator.Progress `json:"progress"`
}

// View returns what this replica knows, without any query.
func (r *Runtime) View() ReplicaView {
	stats := r.listenerStats()
	v := ReplicaView{Ready: r.Ready(), Listener: r.delivery(), Notifications: stats.Notifications, Polls: stats.Polls}
	r.mu.Lock()
	defer r.mu.Unlock()
	if n := r.lastNotice.Load(); n != nil {
		c := *n
		v.LastNotification = &c
	}
	if r.readOnly != nil {
		ro := *r.readOnly
		v.ReadOnly = &ro
	}
	for _, l := range r.lanes {
		s := r.state[l.Name]
		k := KnownLane{Name: l.Name, Version: s.status.Version, Done: s.status.Done(), Role: s.role, Successor: s.successor, HolderPID: s.holderPID, Via: s.via, Paused: s.status.Paused, Progress: s.status.Progress}
		if s.regressed != nil {
			rg := *s.regressed
			k.Regressed = &rg
		}
		if !s.doneAt.IsZero() {
			at := s.doneAt
			k.DoneAt = &at
		}
		v.Lanes = append(v.Lanes, k)
	}
	return v
}

// Status reads the lanes' state from the database, with drift (a few short queries on a
// connection opened for the call and closed after it, so a replica holds no connection for
// its status reads between them) and adds this replica's view. It works before and
// during Start, so a readiness endpoint can show what a starting replica waits for.
//
// A lane version read here lower than the one this replica knows (and not merely stale) is a
// regression, recorded as the listener's reads record it; nothing else of this read changes
// the replica's view.
func (r *Runtime) Status(ctx context.Context) (Status, error) {
	conn, err := engine.Connect(ctx, r.m)
	if err != nil {
		return Status{Replica: r.View()}, fmt.Errorf("app: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return r.statusOn(ctx, conn)
}

// statusOn is Status on a connection of the caller's.
func (r *Runtime) statusOn(ctx context.Context, conn *pgx.Conn) (Status, error) {
	mark := r.readMark()
	lanes, err := r.m.Status(ctx, conn)
	if err == nil {
		// Only a lane that moved backwards is taken from this read: what the replica learns
		// otherwise comes from its listener and its own migrations (KnownLane.Via says which).
		// While the listener is closed (every lane done) this read is all there is: it is
		// taken whole, so that a later deploy's versions show too.
		var back []migrator.LaneStatus
		for _, l := range lanes {
			if r.movedBack(l.Name, l.Version, mark) {
				back = append(back, l)
			}
		}
		if r.delivery() == DeliveryIdle {
			back = lanes
		}
		r.update(back, "status", mark)
		err = r.m.AddDrift(ctx, conn, lanes)
	}
	var server string
	if err == nil {
		var srv pgconnect.Server
		srv, err = pgconnect.ReadServer(ctx, conn)
		server = srv.String()
	}
	st := Status{Replica: r.View(), Server: server}
	if err != nil {
		return st, fmt.Errorf("app: %w", err)
	}
	st.Lanes = lanes
	return st, nil
}

// sync is the listener's handler. On every (re)connect and polling tick it re-reads the lanes'
// state from the database, which settles every pending hint. A notification's payload is never
// trusted: one that does not parse as an Event is ignored without a query, one that does only
// calls for a re-read (see hints.go), which runs at once unless a flood of hints has used up
// its rate limit, and later (the listener's Deferred hook) otherwise.
func (r *Runtime) sync(ctx context.Context, conn *pgx.Conn, n *pgconn.Notification) error {
	defer r.events.bump() // the page shows what this read learned, and the listener's counts
	if n != nil {
		r.reactTo(n)
		_, err := r.react(ctx, conn)
		return err
	}
	via := "connect"
	if r.delivery() == notifier.DeliveryPolling {
		via = "poll"
	}
	r.forgetWatches()                                    // a new session holds none of the old one's keys
	if err := r.readStatus(ctx, conn, via); err != nil { // it covers every hint received before it
		return err
	}
	if via == "connect" {
		r.databaseBack()
	}
	return r.recheckReadOnly(ctx, conn)
}

// applied records what this replica's own Migrate call did, without waiting for the listener.
// mark is readMark taken before the call.
func (r *Runtime) applied(res migrator.Result, mark uint64) {
	via := "applied"
	if res.Applied == 0 {
		via = "check" // its own version read found the work done by another replica
	}
	r.modify(res.Lane, via, mark, func(st *migrator.LaneStatus) {
		// The call has released the lane's lock if it took it: a read made while it ran (the
		// listener's, on this replica's own notification, which arrives before the unlock)
		// saw the lock held, and nothing else would say it is free now that the lane is done.
		st.Locked = false
		if res.To == st.Version {
			return
		}
		st.Version = res.To // lower only when the lane moved backwards: updateLocked decides
		st.Failure, st.Error = nil, ""
		if st.Version >= st.Latest {
			st.State = migrator.StateDone
		}
	})
}

// modify changes one lane's state with f under the mutex, then stores it like update. mark is
// the readMark taken before the read f stores, or noRead when f only raises what is known.
func (r *Runtime) modify(lane, via string, mark uint64, f func(st *migrator.LaneStatus)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.state[lane].status
	f(&st)
	r.updateLocked([]migrator.LaneStatus{st}, via, mark)
}

// noRead is the mark of a change that is no database read of the version.
const noRead = 0

// readMark returns the mark to take before reading lane versions from the database, for
// update and modify: a lower version read after a mark is a regression, unless the version was
// raised after the mark (the read then started before the raise and is merely stale).
func (r *Runtime) readMark() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seq++
	return r.seq
}

// movedBack reports whether version v, read after mark, is lower than what this replica knows
// of the lane and not merely stale.
func (r *Runtime) movedBack(lane string, v int32, mark uint64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.state[lane]
	return v < s.status.Version && s.raisedAt < mark
}

// update stores lane states read after mark, closes the Done channels of lanes that are now
// done and wakes every waiter. A stale read (begun before a raise this replica already knows)
// never lowers a version; a lower version read after it is a regression: logged as an error,
// recorded, and the lane is not done anymore (a new Done channel) until it is applied again.
func (r *Runtime) update(lanes []migrator.LaneStatus, via string, mark uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.updateLocked(lanes, via, mark)
}

// updateLocked is update with r.mu held.
func (r *Runtime) updateLocked(lanes []migrator.LaneStatus, via string, mark uint64) {
	changed := false
	for _, st := range lanes {
		s, ok := r.state[st.Name]
		if !ok {
			continue
		}
		switch {
		case st.Version < s.status.Version && (mark == noRead || s.raisedAt >= mark):
			st.Version = s.status.Version // stale: the read began before a raise
		case st.Version < s.status.Version:
			r.regressLocked(s, st, via)
			changed = true
		case st.Version > s.status.Version:
			r.seq++
			s.raisedAt = r.seq
		}
		if st.Progress != nil && st.Progress.Version <= st.Version {
			st.Progress = nil // that migration has committed
		}
		if st.Version != s.status.Version || st.Error != s.status.Error || st.State != s.status.State || st.Locked != s.status.Locked || st.Paused != s.status.Paused {
			changed = true
		}
		wasDone := s.status.Done()
		s.status = st
		if st.Done() && !wasDone {
			close(s.done)
			s.via, s.doneAt = via, r.cfg.Now()
			if s.migrating {
				s.doneLogLater = true
			} else {
				r.logDone(st.Name, s)
			}
			if st.Version > st.Latest {
				r.log.Warn().Str("lane", st.Name).Int32("version", st.Version).Int32("latest", st.Latest).
					Msg("database is ahead of this binary: a newer deploy applied migrations this binary does not know; treating the lane as done")
			}
		}
	}
	if changed {
		close(r.changed)
		r.changed = make(chan struct{})
		r.events.bump()
	}
}

// regressLocked records that the lane's version moved backwards to st.Version: an error in
// the log, the Regression in the view, and a new Done channel if the lane was done.
func (r *Runtime) regressLocked(s *laneState, st migrator.LaneStatus, via string) {
	from := s.status.Version
	s.regressed = &Regression{From: from, To: st.Version, At: r.cfg.Now(), Via: via}
	r.log.Error().Str("lane", st.Name).Int32("known_version", from).Int32("version", st.Version).Str("via", via).
		Msg("lane version moved backwards (a restored database, a failover to a lagging standby or a manual edit?); applying the lane again")
	if s.status.Done() && !st.Done() {
		s.done = make(chan struct{})
		s.via, s.doneAt = "", time.Time{}
	}
	s.status.Version = st.Version // so that the state below is compared with the lowered one
}

// setMigrating records whether this replica's own Migrate call on the lane runs; when it ends,
// a "lane done" line held back meanwhile is logged, after the files' "OK" lines.
func (r *Runtime) setMigrating(lane string, on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.state[lane]
	s.migrating = on
	if !on && s.doneLogLater {
		s.doneLogLater = false
		r.logDone(lane, s)
	}
}

// logDone logs that the lane is done, with the version and the way this replica learned it.
func (r *Runtime) logDone(lane string, s *laneState) {
	r.log.Info().Str("lane", lane).Int32("version", s.status.Version).Str("via", s.via).Msg("lane done")
}

// setRole records what this replica does with the lane.
func (r *Runtime) setRole(lane, role string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.state[lane].role = role
}

// laneStatus returns the cached state of a lane.
func (r *Runtime) laneStatus(lane string) (migrator.LaneStatus, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.state[lane].status, r.changed
}
