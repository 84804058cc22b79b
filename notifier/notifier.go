// Package notifier keeps one dedicated PostgreSQL connection LISTENing on a channel and tells a
// handler when to re-read durable state: after every (re)connect, after every notification,
// and on a timer while LISTEN is unavailable.
//
// Notifications are hints. They are delivered only to sessions already listening, are lost
// across a reconnect or a server restart, and may be sent by any role. So the listener LISTENs
// first and then calls the handler to read the durable state, on every connect; the handler,
// not the payload, decides what is true.
//
// A Listener owns one goroutine and one connection. It pings the connection on a timer with a
// deadline of its own, so a dead or half-open connection is replaced within PingInterval +
// PingTimeout while listening (within HandlerTimeout while polling), and reconnects with capped exponential backoff and jitter. When LISTEN fails
// (a hot standby) or is proven deaf (a pooler in transaction mode, detected by a probe
// notification sent to itself), it logs that once and polls with the handler every
// PollInterval, trying LISTEN again every RelistenInterval.
package notifier

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/internal/backoff"
	"github.com/multilanes/lanes/internal/connerr"
	"github.com/multilanes/lanes/internal/pgconnect"
)

// Handler reads the durable state on conn. n is nil after a (re)connect and on a polling tick,
// and the notification otherwise. An error is logged and makes the listener reconnect.
// The handler runs on the listener's goroutine and must not keep conn.
type Handler func(ctx context.Context, conn *pgx.Conn, n *pgconn.Notification) error

// Config tunes a Listener. The zero value is valid except for Channel.
type Config struct {
	// Channel to LISTEN on. Required. Taken verbatim (quoted), at most 63 bytes.
	Channel string
	// PingInterval is how long the connection may stay silent before it is pinged.
	// Default: 5s.
	PingInterval time.Duration
	// Check, when set, runs in place of the ping at least every PingInterval, notifications or
	// not, under the PingTimeout deadline. It must run at least one statement on conn (which
	// proves the connection); an error makes the listener reconnect. The app runtime uses it to
	// see whether the lock of a lane it waits for has been released.
	Check func(ctx context.Context, conn *pgx.Conn) error
	// CheckInterval, when set, is called on the listener's goroutine after every check and
	// returns how long until the next one: the app runtime checks more often while this
	// replica is a lane's designated successor. A result that is not positive or exceeds
	// PingInterval means PingInterval. CheckSoon asks for a check at once.
	CheckInterval func() time.Duration
	// Deferred, when set, runs work the handler put off (the app runtime rate-limits the reads
	// a flood of notifications would cause, keeping the latest hint). While listening, the
	// listener calls it on its connection, under HandlerTimeout, after every handler call made
	// for a notification and when the time it last returned comes; it returns when it wants to
	// run next, or the zero time for not before the next notification. An error makes the
	// listener reconnect.
	Deferred func(ctx context.Context, conn *pgx.Conn) (next time.Time, err error)
	// HandlerTimeout bounds each handler call, so that a read stuck on a dead connection (while
	// polling, when no ping runs) is abandoned and the connection replaced. Default: 30s.
	HandlerTimeout time.Duration
	// PingTimeout bounds a ping. Default: 5s.
	PingTimeout time.Duration
	// ConnectTimeout bounds a connect attempt: the connection and LISTEN with its probe. It is
	// separate from PingTimeout so that a short ping bound (quick detection of a
	// half-open connection) does not fail every attempt on a server slow to start a session.
	// Default: 5s, or PingTimeout when that is longer.
	ConnectTimeout time.Duration
	// ReconnectMin and ReconnectMax bound the exponential backoff between reconnect attempts
	// (full jitter). Defaults: 100ms and 1s: a listener back on its server is how a client
	// learns that the database is back (after a restart or a failover), so it tries often; an
	// attempt at a server that is down costs a refused connection.
	ReconnectMin, ReconnectMax time.Duration
	// PollInterval is how often the handler is called while LISTEN is unavailable.
	// Default: 5s.
	PollInterval time.Duration
	// RelistenInterval is how often LISTEN is tried again while polling. Default: 1m.
	RelistenInterval time.Duration
	// ProbeTimeout bounds the wait for the probe notification the listener sends itself after
	// LISTEN, to detect a pooler that accepts LISTEN but never delivers. Zero disables the
	// probe. Default: 2s.
	ProbeTimeout time.Duration
	// Logger receives connection changes. Default: no logging.
	Logger zerolog.Logger
	// BeforeConnect, when set, is called with a copy of the connection configuration before
	// each connection attempt: it may change the copy (a fresh IAM authentication token as
	// Password) or return an error to fail the attempt, which is retried with backoff like any.
	// The app runtime sets it to its Migrator's Config.BeforeConnect when unset.
	BeforeConnect func(ctx context.Context, cc *pgx.ConnConfig) error
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.PingInterval, 5*time.Second)
	def(&c.PingTimeout, 5*time.Second)
	def(&c.ConnectTimeout, max(5*time.Second, c.PingTimeout))
	def(&c.HandlerTimeout, 30*time.Second)
	def(&c.ReconnectMin, 100*time.Millisecond)
	def(&c.ReconnectMax, time.Second)
	def(&c.PollInterval, 5*time.Second)
	def(&c.RelistenInterval, time.Minute)
	if c.ProbeTimeout == 0 {
		c.ProbeTimeout = 2 * time.Second
	}
}

// Delivery is how notifications currently reach a Listener: listening, polling, or neither
// (connecting, stopped).
type Delivery string

// The ways notifications reach a Listener.
const (
	DeliveryConnecting Delivery = "connecting" // no usable connection right now
	DeliveryListening  Delivery = "listening"  // LISTEN works: no queries beyond pings
	DeliveryPolling    Delivery = "polling"    // LISTEN is unavailable: the handler runs every PollInterval
	DeliveryStopped    Delivery = "stopped"
)

// Listener is a LISTEN connection with reconnects. Its methods are safe for concurrent use.
type Listener struct {
	connConfig *pgx.ConnConfig
	cfg        Config
	handler    Handler
	log        zerolog.Logger

	mu          sync.Mutex
	mode        Delivery
	started     bool
	stopped     bool
	startCancel context.CancelFunc // cancels a Start still connecting
	starting    chan struct{}      // closed when Start returns
	cancel      context.CancelFunc
	done        chan struct{}

	stats Stats

	soon bool               // CheckSoon was called: check before waiting again
	wake context.CancelFunc // interrupts the current wait for a notification; nil when none runs

	wasPolling bool // owned by whichever goroutine is connecting: Start's caller, then run
}

// Stats counts what a Listener did, for tests and metrics.
type Stats struct {
	Connects      int // successful connections
	Notifications int // notifications received (probes excluded)
	Syncs         int // handler calls
	Polls         int // handler calls made because LISTEN was unavailable
}

// New returns a Listener; it does not connect. connConfig is copied, with its statement caches
// bounded to 64 statements each.
func New(connConfig *pgx.ConnConfig, cfg Config, handler Handler) (*Listener, error) {
	if connConfig == nil {
		return nil, errors.New("notifier: nil connection config")
	}
	if handler == nil {
		return nil, errors.New("notifier: nil handler")
	}
	if cfg.Channel == "" || len(cfg.Channel) > 63 {
		return nil, fmt.Errorf("notifier: channel %q must be 1 to 63 bytes", cfg.Channel)
	}
	cfg.setDefaults()
	if cfg.ReconnectMax < cfg.ReconnectMin {
		cfg.ReconnectMax = cfg.ReconnectMin
	}
	cc := connConfig.Copy()
	// pgx sizes each connection's two statement caches for 512 statements up front (about 55 KiB
	// a connection), where a listener's connection runs a few dozen distinct statements at most:
	// with a fleet of replicas in one process that was half of each replica's heap.
	cc.StatementCacheCapacity = min(cc.StatementCacheCapacity, listenerCacheCapacity)
	cc.DescriptionCacheCapacity = min(cc.DescriptionCacheCapacity, listenerCacheCapacity)
	return &Listener{connConfig: cc, cfg: cfg, handler: handler, log: cfg.Logger, mode: DeliveryConnecting}, nil
}

// listenerCacheCapacity bounds the statement caches of a Listener's connection: the handler's
// reads and the checks are a few statements per lane; one evicted is only prepared again.
const listenerCacheCapacity = 64

// Start connects, LISTENs and runs the handler once, synchronously, so a configuration error
// fails fast; then it runs the listener in a goroutine until Stop. A LISTEN that is unavailable
// is not an error: the listener starts in polling mode. Start may be called once, or again after
// it failed. A Stop during
// Start cancels it (its connection is closed, its handler call cancelled) and Start returns an
// error.
func (l *Listener) Start(ctx context.Context) error {
	l.mu.Lock()
	if l.started || l.stopped {
		l.mu.Unlock()
		return errors.New("notifier: Start called twice or after Stop")
	}
	l.started = true
	sctx, scancel := context.WithCancel(ctx)
	starting := make(chan struct{})
	l.startCancel, l.starting = scancel, starting
	l.mu.Unlock()
	defer close(starting)
	defer scancel()

	conn, listening, err := l.connect(sctx)
	l.mu.Lock()
	stopped := l.stopped
	if stopped || err != nil {
		l.mode = DeliveryStopped // no connection: claim no mode
		l.mu.Unlock()
		if conn != nil {
			l.close(conn)
		}
		if stopped { // Stop ran while we connected: own nothing
			return errors.Join(errors.New("notifier: stopped while starting"), err)
		}
		l.mu.Lock()
		l.started = false // a failed Start may be tried again
		l.mu.Unlock()
		return err
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	l.cancel, l.done = cancel, done
	l.mu.Unlock()
	go func() {
		defer close(done)
		l.run(runCtx, conn, listening)
	}()
	return nil
}

// Stop stops the listener and waits for its goroutine to end and its connection to close; a
// Start still connecting is cancelled and waited for. Once Stop returns nothing of the
// Listener runs and its Delivery is DeliveryStopped. It is idempotent and safe to call when Start
// failed or was never called.
func (l *Listener) Stop() {
	l.mu.Lock()
	l.stopped = true
	startCancel, starting := l.startCancel, l.starting
	l.mu.Unlock()
	if startCancel != nil {
		startCancel()
		<-starting
	}
	l.mu.Lock()
	cancel, done := l.cancel, l.done
	l.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
	l.setDelivery(DeliveryStopped)
}

// Delivery returns how notifications currently reach the listener.
func (l *Listener) Delivery() Delivery {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.mode
}

// CheckSoon asks the listener to run its check (Config.Check, or the ping) at once rather than
// at the end of the current interval: the app runtime calls it when it starts waiting for a
// lane, so that it joins the lane's waiters at once. While the listener is not listening the
// request waits for the next connection. It never blocks.
func (l *Listener) CheckSoon() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.soon = true
	if l.wake != nil {
		l.wake()
	}
}

// takeSoon reports whether CheckSoon was called since it last returned true.
func (l *Listener) takeSoon() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	soon := l.soon
	l.soon = false
	return soon
}

// setWake records how to interrupt the wait that is about to start (nil once it ended); a
// CheckSoon that came before interrupts it at once.
func (l *Listener) setWake(cancel context.CancelFunc) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.wake = cancel
	if cancel != nil && l.soon {
		cancel()
	}
}

// Stats returns a copy of the listener's counters.
func (l *Listener) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stats
}

func (l *Listener) setDelivery(m Delivery) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.mode = m
}

func (l *Listener) count(f func(*Stats)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f(&l.stats)
}

// run owns conn until ctx is done, replacing it whenever it fails. A lost connection is logged
// as a warning (a restart or a failover interrupts it, and it comes back), and so is its return,
// with how long it was gone.
func (l *Listener) run(ctx context.Context, conn *pgx.Conn, listening bool) {
	attempt := 0
	lastFailure := ""
	var lostAt time.Time // when the connection was lost; zero while it works
	for {
		if conn != nil {
			var err error
			if listening {
				err = l.listen(ctx, conn)
			} else {
				err = l.poll(ctx, conn)
			}
			l.close(conn)
			conn = nil
			if ctx.Err() != nil {
				return
			}
			if err != nil && !errors.Is(err, errRelisten) {
				l.log.Warn().Err(connerr.Compact(err)).Msg("notification connection lost; reconnecting")
				lostAt = time.Now()
			}
			attempt = 0
		}
		l.setDelivery(DeliveryConnecting)
		wait := time.Duration(0)
		if attempt > 0 {
			wait = backoff.Exponential(attempt-1, l.cfg.ReconnectMin, l.cfg.ReconnectMax)
		}
		if err := backoff.Sleep(ctx, wait); err != nil {
			return
		}
		attempt++
		var err error
		conn, listening, err = l.connect(ctx)
		if ctx.Err() != nil {
			if conn != nil {
				l.close(conn)
			}
			return
		}
		if err != nil {
			// Say it once per kind of failure, not once per attempt.
			if msg := err.Error(); msg != lastFailure {
				l.log.Warn().Err(connerr.Compact(err)).Int("attempt", attempt).Msg("cannot reconnect the notification connection; retrying with backoff")
				lastFailure = msg
			}
			continue
		}
		lastFailure = ""
		if !lostAt.IsZero() {
			l.log.Info().Float64("down_s", time.Since(lostAt).Seconds()).Int("attempts", attempt).
				Str("delivery", string(l.Delivery())).Msg("notification connection back")
			lostAt = time.Time{}
		}
	}
}

var errRelisten = errors.New("time to try LISTEN again")

// connect opens a connection, LISTENs (falling back to polling mode when LISTEN is unavailable)
// and runs the handler, in that order, so no change committed after the handler's read can be
// missed.
func (l *Listener) connect(ctx context.Context) (*pgx.Conn, bool, error) {
	cctx, cancel := context.WithTimeout(ctx, l.cfg.ConnectTimeout)
	defer cancel()
	cc := l.connConfig
	if l.cfg.BeforeConnect != nil {
		cc = cc.Copy()
		if err := l.cfg.BeforeConnect(cctx, cc); err != nil {
			return nil, false, fmt.Errorf("notifier: connect: before connect: %w", err)
		}
	}
	conn, err := pgconnect.Connect(cctx, cc)
	if err != nil {
		return nil, false, fmt.Errorf("notifier: connect: %w", err)
	}
	l.count(func(s *Stats) { s.Connects++ })
	listening, err := l.tryListen(cctx, conn)
	if err != nil {
		l.close(conn)
		return nil, false, err
	}
	if err := l.sync(ctx, conn, nil); err != nil {
		l.close(conn)
		return nil, false, err
	}
	if listening {
		l.setDelivery(DeliveryListening)
	} else {
		l.setDelivery(DeliveryPolling)
	}
	return conn, listening, nil
}

// tryListen runs LISTEN and proves it with a probe. It returns false (and logs once per change)
// when LISTEN is refused or deaf, and an error only when the connection itself failed.
func (l *Listener) tryListen(ctx context.Context, conn *pgx.Conn) (bool, error) {
	channel := pgx.Identifier{l.cfg.Channel}.Sanitize()
	_, err := conn.Exec(ctx, "listen "+channel)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && !conn.IsClosed() && (pgErr.Code == "25006" || pgErr.Code == "0A000") {
		// 25006: a hot standby ("cannot execute LISTEN during recovery"); 0A000: a proxy or
		// server that does not support it. Anything else is a connection problem: reconnect.
		l.fallback(fmt.Sprintf("LISTEN refused: %s (SQLSTATE %s)", pgErr.Message, pgErr.Code))
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("notifier: listen: %w", err)
	}
	if l.cfg.ProbeTimeout > 0 {
		ok, err := l.probe(ctx, conn)
		if err != nil {
			return false, err
		}
		if !ok {
			_, _ = conn.Exec(ctx, "unlisten *")
			l.fallback("LISTEN accepted but a probe notification never arrived (a pooler in transaction or statement mode?)")
			return false, nil
		}
	}
	if l.wasPolling {
		l.log.Info().Str("channel", l.cfg.Channel).Msg("LISTEN works again; stopped polling")
		l.wasPolling = false
	}
	return true, nil
}

// probe sends a notification on a channel only this session listens on and waits for it. The
// notification is sent from a second, short-lived connection, as the notifications the listener
// waits for are: through a pooler in transaction mode a session's own NOTIFY comes back inline,
// in the answer to the statement that sent it, while a notification from any other session
// reaches a server connection that no client is linked to and is dropped (PgBouncer logs "got
// packet 'A' from server when not linked"). When the second connection cannot be made, the
// probe is sent from the listening session itself, which proves less.
func (l *Listener) probe(ctx context.Context, conn *pgx.Conn) (bool, error) {
	var b [8]byte
	_, _ = rand.Read(b[:])
	probe := pgx.Identifier{"lanes_probe_" + hex.EncodeToString(b[:])}.Sanitize()
	// Separate statements: LISTEN and UNLISTEN take effect at commit, so one implicit
	// transaction holding all three would never deliver the probe.
	if _, err := conn.Exec(ctx, "listen "+probe); err != nil {
		return false, fmt.Errorf("notifier: probe: %w", err)
	}
	defer func() { _, _ = conn.Exec(ctx, "unlisten "+probe) }()
	nctx, ncancel := context.WithTimeout(ctx, l.cfg.ProbeTimeout)
	err := l.notifyFromAnotherSession(nctx, probe)
	ncancel()
	if err != nil {
		l.log.Debug().Err(err).Msg("probe from a second connection failed; probing from the listening session")
		if _, err := conn.Exec(ctx, "notify "+probe); err != nil {
			return false, fmt.Errorf("notifier: probe: %w", err)
		}
	}
	// The wait for the probe gets its own ProbeTimeout, whatever the second connection took.
	pctx, cancel := context.WithTimeout(ctx, l.cfg.ProbeTimeout)
	defer cancel()
	for {
		n, err := conn.WaitForNotification(pctx)
		if err != nil {
			if pctx.Err() != nil && ctx.Err() == nil && !conn.IsClosed() {
				return false, nil
			}
			return false, fmt.Errorf("notifier: probe: %w", err)
		}
		if n.Channel == probe[1:len(probe)-1] {
			return true, nil
		}
		// A real notification that arrived meanwhile: connect's handler call re-reads the state.
		l.count(func(s *Stats) { s.Notifications++ })
	}
}

// notifyFromAnotherSession sends NOTIFY channel from a short-lived connection of its own.
func (l *Listener) notifyFromAnotherSession(ctx context.Context, channel string) error {
	c, err := pgconnect.Connect(ctx, l.connConfig)
	if err != nil {
		return err
	}
	defer c.Close(context.WithoutCancel(ctx))
	_, err = c.Exec(ctx, "notify "+channel, pgx.QueryExecModeSimpleProtocol)
	return err
}

func (l *Listener) fallback(why string) {
	if !l.wasPolling {
		l.log.Warn().Str("channel", l.cfg.Channel).Float64("poll_interval_s", l.cfg.PollInterval.Seconds()).
			Msgf("%s; polling instead until LISTEN works", why)
	}
	l.wasPolling = true
}

// listen waits for notifications and pings (or runs Check) every PingInterval. It returns when
// the connection fails or ctx is done.
func (l *Listener) listen(ctx context.Context, conn *pgx.Conn) error {
	lastCheck := time.Now()
	interval := l.checkInterval()
	var next time.Time // when Config.Deferred runs next; zero: not scheduled
	for {
		now := time.Now()
		if !next.IsZero() && !now.Before(next) {
			var err error
			if next, err = l.deferred(ctx, conn); err != nil {
				return err
			}
			continue
		}
		wait := interval - now.Sub(lastCheck)
		if wait <= 0 || l.takeSoon() {
			if err := l.check(ctx, conn); err != nil {
				return err
			}
			lastCheck = time.Now()
			interval = l.checkInterval()
			continue
		}
		if !next.IsZero() {
			wait = min(wait, next.Sub(now))
		}
		wctx, cancel := context.WithTimeout(ctx, wait)
		l.setWake(cancel)
		n, err := conn.WaitForNotification(wctx)
		l.setWake(nil)
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			// A timeout or a CheckSoon (ctx is not done: the wait's own context was
			// cancelled) leaves the connection usable: time to check.
			if !(pgconn.Timeout(err) || errors.Is(err, context.Canceled)) || conn.IsClosed() {
				return fmt.Errorf("wait for notification: %w", err)
			}
			continue
		}
		l.count(func(s *Stats) { s.Notifications++ })
		if err := l.sync(ctx, conn, n); err != nil {
			return err
		}
		if next, err = l.deferred(ctx, conn); err != nil {
			return err
		}
	}
}

// deferred runs Config.Deferred under HandlerTimeout and returns when to run it next.
func (l *Listener) deferred(ctx context.Context, conn *pgx.Conn) (time.Time, error) {
	if l.cfg.Deferred == nil {
		return time.Time{}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, l.cfg.HandlerTimeout)
	defer cancel()
	next, err := l.cfg.Deferred(ctx, conn)
	if err != nil {
		return time.Time{}, fmt.Errorf("notifier: deferred: %w", err)
	}
	return next, nil
}

// checkInterval returns how long until the next check: Config.CheckInterval's answer, within
// (0, PingInterval].
func (l *Listener) checkInterval() time.Duration {
	if l.cfg.CheckInterval == nil {
		return l.cfg.PingInterval
	}
	if d := l.cfg.CheckInterval(); d > 0 && d < l.cfg.PingInterval {
		return d
	}
	return l.cfg.PingInterval
}

// check pings the connection, or runs Config.Check, under PingTimeout.
func (l *Listener) check(ctx context.Context, conn *pgx.Conn) error {
	pctx, cancel := context.WithTimeout(ctx, l.cfg.PingTimeout)
	defer cancel()
	var err error
	if l.cfg.Check != nil {
		err = l.cfg.Check(pctx, conn)
	} else {
		err = conn.Ping(pctx)
	}
	if err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	return nil
}

// poll calls the handler every PollInterval and returns errRelisten after RelistenInterval so
// that run reconnects and tries LISTEN again.
func (l *Listener) poll(ctx context.Context, conn *pgx.Conn) error {
	relisten := time.Now().Add(l.cfg.RelistenInterval)
	for {
		if err := backoff.Sleep(ctx, l.cfg.PollInterval); err != nil {
			return err
		}
		l.count(func(s *Stats) { s.Polls++ })
		if err := l.sync(ctx, conn, nil); err != nil {
			return err
		}
		if time.Now().After(relisten) {
			return errRelisten
		}
	}
}

func (l *Listener) sync(ctx context.Context, conn *pgx.Conn, n *pgconn.Notification) error {
	l.count(func(s *Stats) { s.Syncs++ })
	ctx, cancel := context.WithTimeout(ctx, l.cfg.HandlerTimeout)
	defer cancel()
	if err := l.handler(ctx, conn, n); err != nil {
		return fmt.Errorf("notifier: handler: %w", err)
	}
	return nil
}

func (l *Listener) close(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = conn.Close(ctx) // the connection is being dropped; its close error changes nothing
}
