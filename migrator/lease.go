package migrator

// The lane lease: a row per lane in the lease table, the part of a lane's lock that works
// through a transaction pooler, and the fencing epoch every commit of an applier checks.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/session"
)

// DefaultLeaseTable is the table holding each lane's lease (see Config.LeaseTTL), in the
// history table's schema.
const DefaultLeaseTable = "lanes_lease"

// ErrLeaseLost is returned (wrapped) when an applier finds that it no longer holds the lane:
// its lease expired and another session took the lane over (the epoch moved on), so the commit
// that would record its work was refused and rolled back. errors.Is(err, ErrLocked) is true:
// another session holds the lane now. It is not recorded as a failure.
var ErrLeaseLost = fmt.Errorf("lane lease lost to another session (it expired and was taken over): nothing more of this run was committed: %w", ErrLocked)

func (m *Migrator) leaseTable() tableName { return m.sideTable(DefaultLeaseTable) }

// ensureLeaseTable creates the lease table when it does not exist, serialised like the history
// table. Once seen it is not looked up again by this Migrator.
func (m *Migrator) ensureLeaseTable(ctx context.Context, conn *pgx.Conn) error {
	if m.leaseSeen.Load() {
		return nil
	}
	t := m.leaseTable()
	var exists bool
	if err := conn.QueryRow(ctx, "select to_regclass($1) is not null", t.Quoted()).Scan(&exists); err != nil {
		return fmt.Errorf("look up lease table %s: %w", t, err)
	}
	if !exists {
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "select pg_advisory_xact_lock($1)", setupLockKey); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, fmt.Sprintf(`create table if not exists %s (
  key int8 primary key,
  lane text not null,
  holder text not null,
  session_pid int4,
  epoch int8 not null,
  expires_at timestamptz not null,
  acquired_at timestamptz not null
)`, t.Quoted()))
			return err
		})
		if err != nil {
			return fmt.Errorf("create lease table %s: %w", t, err)
		}
	}
	m.leaseSeen.Store(true)
	return nil
}

// leaseHeldSQL is the condition, over the lease table aliased "ls", under which a lease row
// still holds its lane: a session lease (session_pid set) while its session, if not the current
// one, holds the lane's advisory lock; a timed lease until it expires.
const leaseHeldSQL = `(case when ls.session_pid is not null then exists (select 1 from pg_locks
    where locktype = 'advisory' and granted and pid = ls.session_pid and database = (select oid from pg_database where datname = current_database())
      and (classid::int8 << 32 | objid::int8) = ls.key and objsubid = 1)
      and ls.session_pid <> pg_backend_pid()
  else ls.expires_at > clock_timestamp() end)`

// advisoryHeldSQL returns a condition true when a session other than the current one holds one
// of keys as a session-level advisory lock in this database.
func advisoryHeldSQL(keys []int64) string {
	var pairs []string
	for _, k := range keys {
		pairs = append(pairs, fmt.Sprintf("(%d, %d)", uint32(uint64(k)>>32), uint32(uint64(k))))
	}
	return `exists (select 1 from pg_locks where locktype = 'advisory' and granted and pid <> pg_backend_pid()
    and database = (select oid from pg_database where datname = current_database())
    and (classid::int8, objid::int8) in (` + strings.Join(pairs, ", ") + `) and objsubid = 1)`
}

// acquireLease takes the lane's lease row with one statement and returns its new epoch, or 0
// when another session holds the lane. A session lease (session true: the caller holds the
// lane's advisory lock on conn) lives as long as that lock, and its expires_at is a heartbeat
// (clock_timestamp() + SilenceBound unless renewed, see endSilentHolder); a timed lease lives
// until clock_timestamp() + LeaseTTL unless renewed. A lease row is taken over when it no longer holds its
// lane (leaseHeldSQL); never while a session other than conn's holds one of the lane's advisory
// locks (an applier of a release without leases, or a session applier that has not written
// its row yet). Concurrent takers serialise on the row: exactly one gets each epoch.
func (l *laneLock) acquireLease(ctx context.Context, session bool) (int64, error) {
	t := l.m.leaseTable().Quoted()
	q := `insert into ` + t + ` as ls (key, lane, holder, session_pid, epoch, expires_at, acquired_at)
select $1, $2, $3, case when $4 then pg_backend_pid() end, 1,
  clock_timestamp() + $5::int8 * interval '1 millisecond', clock_timestamp()
where not ` + advisoryHeldSQL(l.keys) + `
on conflict (key) do update set lane = excluded.lane, holder = excluded.holder, session_pid = excluded.session_pid,
  epoch = ls.epoch + 1, expires_at = excluded.expires_at, acquired_at = excluded.acquired_at
where not ` + leaseHeldSQL + `
returning epoch`
	var epoch int64
	err := l.conn.QueryRow(ctx, q, l.keys[0], l.lane, l.m.holder(), session, l.term(session).Milliseconds()).Scan(&epoch)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("take lane lease: %w", err)
	}
	return epoch, nil
}

// begin begins a transaction of an applier. Through a transaction pooler (a timed lease) the
// session settings set after connecting (see PrepareConnConfig) are on whichever server
// connection ran that statement, so the transaction sets them again for itself (set_config
// with is_local): the server connection running a killed replica's migration then notices the
// dead client within about a second, and its locks go with it.
func (m *Migrator) begin(ctx context.Context, conn *pgx.Conn) (pgx.Tx, error) {
	tx, err := conn.Begin(ctx)
	if err != nil || !m.timedLease() || m.setFailed.Load() {
		return tx, err
	}
	version, err := session.ServerVersion(ctx, conn.PgConn())
	if err == nil {
		skip := map[string]bool{}
		for _, k := range m.userSet {
			skip[k] = true
		}
		if q := session.LocalSQL(version, skip); q != "" {
			_, err = tx.Exec(ctx, q)
		}
	}
	if err != nil {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = tx.Rollback(rctx)
		return nil, fmt.Errorf("set the transaction's settings: %w", err)
	}
	return tx, nil
}

// term is how long the lease lives unless renewed: LeaseTTL for a timed lease, SilenceBound
// for the heartbeat of a session lease.
func (l *laneLock) term(session bool) time.Duration {
	if session {
		return l.m.cfg.SilenceBound
	}
	return l.m.cfg.LeaseTTL
}

// holder names this replica in the lease table.
func (m *Migrator) holder() string {
	return fmt.Sprintf("%s pid %d (%s)", m.host, m.pid, m.appName)
}

// fence runs inside every transaction that records an applier's progress or a version: it
// checks that the lease still has this lock's epoch and extends it (a timed lease, or a session
// lease's heartbeat). The row
// stays locked until the transaction ends, so no other session can take the lane between the
// check and the commit; a lease taken over since (a new epoch) makes it return an error
// wrapping ErrLeaseLost and the transaction must roll back. One short statement.
func (l *laneLock) fence(ctx context.Context, tx pgx.Tx) error {
	if l == nil || l.epoch == 0 {
		return nil
	}
	var sameSession bool
	err := tx.QueryRow(ctx, "update "+l.m.leaseTable().Quoted()+` set expires_at = greatest(expires_at, clock_timestamp() + $3::int8 * interval '1 millisecond')
where key = $1 and epoch = $2
returning session_pid is null or session_pid = pg_backend_pid()`, l.keys[0], l.epoch, l.term(!l.timed).Milliseconds()).Scan(&sameSession)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return fmt.Errorf("lane %q, epoch %d: %w", l.lane, l.epoch, ErrLeaseLost)
	case err != nil:
		return fmt.Errorf("check lane lease: %w", err)
	case !sameSession:
		return fmt.Errorf("lane %q: %w", l.lane, ErrSessionMoved)
	}
	return nil
}

// ErrSessionMoved is returned (wrapped) when a transaction of an applier holding the lane's
// session lock runs on another server session than the lock: the connection goes through a
// pooler in transaction mode that CheckSessions did not detect (a busy pool). The transaction is
// rolled back; configure the pooler (Config.TransactionPooler, LANES_POOL_MODE=transaction).
var ErrSessionMoved = errors.New("this transaction runs on another server session than the lane's session lock: the connection goes through a pooler in transaction mode (set Config.TransactionPooler, or LANES_POOL_MODE=transaction)")

// releaseLease gives the lease row up (expired at once), if it still has this lock's epoch.
func (l *laneLock) releaseLease(ctx context.Context, conn *pgx.Conn) error {
	if l.epoch == 0 {
		return nil
	}
	_, err := conn.Exec(ctx, "update "+l.m.leaseTable().Quoted()+" set session_pid = null, expires_at = '-infinity' where key = $1 and epoch = $2",
		l.keys[0], l.epoch)
	if err != nil {
		return fmt.Errorf("release lane lease: %w", err)
	}
	return nil
}

// renewer keeps a lease alive, a timed lease or a session lease's heartbeat: every third of
// its term (LeaseTTL, SilenceBound) it extends the lease on a connection of its own (the
// applying connection is busy running the migration), trying again every tenth of the term
// after a failed attempt, and calls lost once when the lease no
// longer has its epoch or could not be renewed before it expired. A session lease's renewer
// also watches the applier's own connection: when that connection stalled (see endIfStalled)
// while this one flows, it ends the lane's session and calls lost. stop ends it and waits.
type renewer struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func (l *laneLock) startRenewer(ctx context.Context, lost func()) *renewer {
	wire := watched(l.conn)
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	r := &renewer{cancel: cancel}
	r.wg.Go(func() {
		var conn *pgx.Conn
		defer func() {
			if conn != nil {
				cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_ = conn.Close(cctx)
			}
		}()
		ttl := l.term(!l.timed)
		started := time.Now()
		deadline := started.Add(ttl)
		warnedStall := false
		var applying *watchedConn // the applier's connection, watched for a stall (session leases)
		if !l.timed {
			applying = wire
		}
		// Connect before the first renewal is due, so that a slow connect (a loaded server)
		// does not spend that renewal's time; not at once, so that a short run (most lanes'
		// runs) opens no second connection.
		select {
		case <-ctx.Done():
			return
		case <-time.After(ttl / 10):
		}
		func() {
			cctx, cancel := context.WithTimeout(ctx, ttl/3)
			defer cancel()
			if c, err := l.m.connect(cctx); err == nil {
				conn = c
			}
		}()
		// Renew every third of the term; after a failed attempt, try again after a tenth of
		// it, until the lease expires: one slow or failed statement does not cost the lane.
		next := time.NewTimer(max(0, ttl/3-time.Since(started)))
		defer next.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-next.C:
			}
			next.Reset(ttl / 3)
			stalled := false
			ok, err := func() (bool, error) {
				rctx, cancel := context.WithTimeout(ctx, ttl/3)
				defer cancel()
				if conn == nil || conn.IsClosed() {
					c, err := l.m.connect(rctx)
					if err != nil {
						return false, err
					}
					conn = c
				}
				began := time.Now()
				// A lease extended by a fence within the last sixth of its term (a backfill's
				// batches) is left alone: the renewal would only queue behind the batch's row
				// lock, or make the batch's fence queue behind it (and fail on the batch's
				// lock_timeout). left is how long the lease still lives; NULL once lost.
				t := l.m.leaseTable().Quoted()
				var left *float64
				err := conn.QueryRow(rctx, `with renewed as (update `+t+` set expires_at = clock_timestamp() + $3::int8 * interval '1 millisecond'
  where key = $1 and epoch = $2 and expires_at < clock_timestamp() + $3::int8 * interval '1 millisecond' * 5 / 6
  returning expires_at)
select extract(epoch from coalesce((select expires_at from renewed), (select expires_at from `+t+` where key = $1 and epoch = $2)) - clock_timestamp())::float8`,
					l.keys[0], l.epoch, ttl.Milliseconds()).Scan(&left)
				if err != nil {
					return false, err
				}
				if left != nil {
					deadline = began.Add(min(ttl, time.Duration(*left*float64(time.Second))))
				}
				if left != nil && applying != nil {
					// After the renewal, so that a check that fails (a role that may not run
					// pg_terminate_backend) never costs a healthy applier its heartbeat.
					if waited := applying.awaiting(); waited >= ttl {
						ended, err := l.endIfStalled(rctx, conn, waited, ttl)
						if err != nil && !warnedStall {
							warnedStall = true
							l.m.cfg.Logger.Warn().Err(err).Str("lane", l.lane).
								Msg("cannot check whether the connection applying the lane has stalled (a silent connection would then hold the lane until its session ends)")
						}
						stalled = ended
					}
				}
				return left != nil, nil
			}()
			switch {
			case ctx.Err() != nil:
				return
			case stalled:
				lost() // endIfStalled said why
				return
			case err == nil && !ok:
				l.m.cfg.Logger.Warn().Str("lane", l.lane).Int64("epoch", l.epoch).Msg("lane lease taken over by another session: stopping this run")
				lost()
				return
			case err != nil && time.Now().After(deadline):
				l.m.cfg.Logger.Warn().Err(err).Str("lane", l.lane).Int64("epoch", l.epoch).Float64("term_s", ttl.Seconds()).
					Msg("could not renew the lane lease before it expired (another replica may end this session and take the lane over): stopping this run")
				lost()
				return
			case err != nil:
				next.Reset(ttl / 10)
				l.m.cfg.Logger.Debug().Err(err).Str("lane", l.lane).Msg("renew lane lease")
				if conn != nil && !isPgError(err) {
					_ = conn.Close(context.Background())
					conn = nil
				}
			}
		}
	})
	return r
}

func (r *renewer) stop() {
	if r == nil {
		return
	}
	r.cancel()
	r.wg.Wait()
}

func isPgError(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr)
}

// laneFree reports whether nothing holds the lane (see engine.LaneFree). The same statement
// looks for a holder whose heartbeat expired (see silentSQL); when the lane is held by one,
// laneFree ends that session (endSilent) and reports the lane held: the next check finds it
// free once the server has ended the session.
func (m *Migrator) laneFree(ctx context.Context, q engine.Querier, lane string) (bool, error) {
	l, ok := m.byName[lane]
	if !ok {
		return false, fmt.Errorf("lane %q: %w", lane, ErrUnknownLane)
	}
	key := l.table.lockKey()
	var free bool
	var s silent
	err := q.QueryRow(ctx, `select case when pg_try_advisory_lock($1) then pg_advisory_unlock($1) else false end
  and not exists (select 1 from `+m.leaseTable().Quoted()+` ls where ls.lane = $2 and `+leaseHeldSQL+`),
  s.key, s.epoch, s.session_pid
from (select 1) one left join lateral (select ls.key, ls.epoch, ls.session_pid from `+m.leaseTable().Quoted()+` ls
  where ls.lane = $2 and `+silentSQL+` limit 1) s on true`, key, lane).Scan(&free, &s.key, &s.epoch, &s.pid)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // no lease table yet: no lease
		err = q.QueryRow(ctx, "select case when pg_try_advisory_lock($1) then pg_advisory_unlock($1) else false end", key).Scan(&free)
	}
	if err != nil {
		return false, fmt.Errorf("lane %q: check its lock: %w", lane, err)
	}
	if !free && s.pid != nil {
		m.endSilent(ctx, q, lane, s)
	}
	return free, nil
}

// silentSQL is the condition, over the lease table aliased "ls", under which a session lease's
// holder has gone silent: its heartbeat expired (expires_at, renewed every SilenceBound/3 by a
// healthy applier, lies in the past) while its session, not the current one, still holds the
// lane's advisory lock, and that session is the one that took the lease (it did not start after
// the lease was acquired: a new backend given the same pid is not the lease's holder; a role
// that may not see the session's start takes the pid for it). A session lease written by a
// release without heartbeats expires at infinity: never silent.
const silentSQL = `ls.session_pid is not null and ls.session_pid <> pg_backend_pid() and ls.expires_at < clock_timestamp()
  and exists (select 1 from pg_locks
    where locktype = 'advisory' and granted and pid = ls.session_pid and database = (select oid from pg_database where datname = current_database())
      and (classid::int8 << 32 | objid::int8) = ls.key and objsubid = 1)
  and coalesce((select a.backend_start <= ls.acquired_at from pg_stat_activity a where a.pid = ls.session_pid), true)`

// silent is a lease row whose holder was found silent.
type silent struct {
	key, epoch *int64
	pid        *int32
}

// endSilentHolder looks for a silent holder of the lane (see silentSQL) and ends its session
// (see endSilent): one statement while there is none. It reports whether it ended one.
func (m *Migrator) endSilentHolder(ctx context.Context, q engine.Querier, lane string) (bool, error) {
	var s silent
	err := q.QueryRow(ctx, `select ls.key, ls.epoch, ls.session_pid from `+m.leaseTable().Quoted()+` ls
where ls.lane = $1 and `+silentSQL+` limit 1`, lane).Scan(&s.key, &s.epoch, &s.pid)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("lane %q: look for a silent holder: %w", lane, err)
	}
	return m.endSilent(ctx, q, lane, s), nil
}

// endSilent ends the session of a silent holder found as s, with pg_terminate_backend: in one
// statement that checks again that the lease row still has s's epoch and pid and that its
// holder is still silent (silentSQL), so that neither a holder that renewed its heartbeat since
// nor a new holder is ended. The ended session's transaction rolls back, the server frees its
// lock, and the next taker moves the lease's epoch on, which the old holder's fence then
// refuses. Without the permission (the same role, or pg_signal_backend; a superuser's session
// only by a superuser) it warns once per Migrator and leaves the session alone. It logs a
// warning naming the lane, the holder and how long the holder was silent, and reports whether
// it ended the session; a failed statement is logged, not returned (the caller keeps waiting).
func (m *Migrator) endSilent(ctx context.Context, q engine.Querier, lane string, s silent) bool {
	var (
		holder  string
		expired float64
		ended   *bool
	)
	err := q.QueryRow(ctx, `select ls.holder, extract(epoch from clock_timestamp() - ls.expires_at)::float8,
  case when r.rolsuper and not (select rolsuper from pg_roles where rolname = current_user) then null
    when pg_has_role(a.usesysid, 'USAGE') or pg_has_role('pg_signal_backend'::name, 'USAGE') then pg_terminate_backend(ls.session_pid)
  end
from `+m.leaseTable().Quoted()+` ls
left join pg_stat_activity a on a.pid = ls.session_pid
left join pg_roles r on r.oid = a.usesysid
where ls.key = $1 and ls.epoch = $2 and ls.session_pid = $3 and `+silentSQL, *s.key, *s.epoch, *s.pid).Scan(&holder, &expired, &ended)
	if errors.Is(err, pgx.ErrNoRows) {
		return false // renewed, released or taken over since it was found
	}
	if err != nil {
		m.cfg.Logger.Warn().Err(err).Str("lane", lane).Int32("pid", *s.pid).Msg("could not end the session of the lane's silent applier; waiting")
		return false
	}
	// The heartbeat was last renewed about SilenceBound before it expired (assuming the holder
	// has the same bound as this replica).
	silence := time.Duration(expired*float64(time.Second)) + m.cfg.SilenceBound
	if ended == nil || !*ended {
		m.warnSilent.Do(func() {
			m.cfg.Logger.Warn().Str("lane", lane).Str("holder", holder).Int32("pid", *s.pid).Float64("silent_s", silence.Seconds()).
				Msg("the lane's applier has gone silent but this role may not end its session (grant pg_signal_backend, or use the applier's role): waiting for it")
		})
		return false
	}
	m.cfg.Logger.Warn().Str("lane", lane).Str("holder", holder).Int32("pid", *s.pid).Int64("epoch", *s.epoch).Float64("silent_s", silence.Seconds()).
		Float64("silence_bound_s", m.cfg.SilenceBound.Seconds()).
		Msg("the lane's applier went silent (its heartbeat expired while its session holds the lane): ended its session to take the lane over")
	return true
}
