package migrator

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/internal/backoff"
)

// progressLogEvery is the cadence of the applier's progress log line.
const progressLogEvery = 10 * time.Second

// announceEvery bounds the progress notifications of one lane.
const announceEvery = time.Second

// walk is one run of a batched migration on the applying connection.
type walk struct {
	m    *Migrator
	conn *pgx.Conn
	l    *loadedLane
	mig  *Migration
	b    *batchSpec
	log  zerolog.Logger

	upper   *int64 // frozen upper end of a keyed walk; nil: nothing to walk
	cursor  string
	done    int64
	total   int64
	sz      *sizer
	rate    float64 // smoothed units per second
	started time.Time

	lastEnd      time.Time // when the previous batch committed
	lastDur      time.Duration
	lastAnnounce time.Time
	lastLog      time.Time
	throttled    string
	health       string
	lag          lagProbe
	trace        *Trace
}

// applyBatched runs a batched migration: one transaction per batch, each committing the batch's
// work with the walk's cursor and counters; then a last transaction bumps the version, writes
// the history row and announces the completion.
func (m *Migrator) applyBatched(ctx context.Context, conn *pgx.Conn, l *loadedLane, mig *Migration, start time.Time) error {
	if err := m.ensureSideTables(ctx, conn); err != nil {
		return m.wrap(mig, statement{}, err)
	}
	w := &walk{m: m, conn: conn, l: l, mig: mig, b: mig.batch, started: start, trace: traceFrom(ctx),
		log: m.cfg.Logger.With().Str("lane", l.Name).Int32("version", mig.Version).Str("file", mig.Name).Logger()}
	if err := w.open(ctx); err != nil {
		return err
	}
	for {
		fin, err := w.step(ctx)
		if err != nil {
			return err
		}
		if fin {
			break
		}
		if err := w.between(ctx); err != nil {
			return err
		}
	}
	return m.inTx(ctx, conn, mig, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "update "+m.progressTable().Quoted()+" set finished_at = now(), updated_at = now(), throttled = '' where lane = $1 and version = $2",
			l.Name, mig.Version); err != nil {
			return m.wrap(mig, statement{}, fmt.Errorf("record progress: %w", err))
		}
		return m.record(ctx, tx, l, mig, start)
	})
}

// open checks what a keyed walk covers and reads the walk's durable progress, or starts it:
// the upper end is frozen at the key's maximum now.
func (w *walk) open(ctx context.Context) error {
	b := w.b
	if b.keyed() {
		if err := w.checkKey(ctx); err != nil {
			return err
		}
	}
	var (
		upper, total *int64
		batchSize    int
		checksum     string
	)
	err := w.conn.QueryRow(ctx, "select cursor, upper_key, done, total, batch_size, checksum from "+w.m.progressTable().Quoted()+
		" where lane = $1 and version = $2 and finished_at is null", w.l.Name, w.mig.Version).Scan(&w.cursor, &upper, &w.done, &total, &batchSize, &checksum)
	switch {
	case err == nil:
		w.upper = upper
		w.total = deref64(total)
		w.sz = resumeSizer(w.b.size, batchSize, w.m.cfg.Batch.Target)
		if checksum != w.mig.Checksum {
			w.log.Warn().Msg("the batched migration changed since its walk started; continuing the walk from its last committed batch with the new file")
			if _, err := w.conn.Exec(ctx, "update "+w.m.progressTable().Quoted()+" set checksum = $3 where lane = $1 and version = $2", w.l.Name, w.mig.Version, w.mig.Checksum); err != nil {
				return w.m.wrap(w.mig, statement{}, fmt.Errorf("record progress: %w", err))
			}
		}
		w.log.Info().Str("cursor", w.cursor).Int64("done", w.done).Int64("total", w.total).Msg("resuming the batched migration after its last committed batch")
	case errors.Is(err, pgx.ErrNoRows):
		if err := w.start(ctx); err != nil {
			return err
		}
	default:
		return w.m.wrap(w.mig, statement{}, fmt.Errorf("read progress: %w", err))
	}
	w.lastEnd, w.lastLog = time.Now(), time.Now()
	return nil
}

// start records a new walk: for a keyed walk its frozen ends and an estimate of its rows.
func (w *walk) start(ctx context.Context) error {
	b := w.b
	var lower *int64
	if b.keyed() {
		k := pgx.Identifier{b.key}.Sanitize()
		var lo, hi *int64
		if err := w.conn.QueryRow(ctx, "select min("+k+")::int8, max("+k+")::int8 from "+b.table.Quoted()).Scan(&lo, &hi); err != nil {
			return w.m.wrap(w.mig, statement{}, fmt.Errorf("read the ends of %s.%s: %w", b.table, b.key, err))
		}
		if lo != nil {
			if *lo == math.MinInt64 {
				return w.m.wrap(w.mig, statement{}, fmt.Errorf("batch key %s of %s holds the smallest int8, which a walk cannot start below", b.key, b.table))
			}
			l := *lo - 1
			lower, w.upper, w.cursor = &l, hi, strconv.FormatInt(l, 10)
			var est int64
			if err := w.conn.QueryRow(ctx, "select greatest(reltuples, -1)::int8 from pg_class where oid = $1::regclass", b.table.Quoted()).Scan(&est); err != nil {
				return w.m.wrap(w.mig, statement{}, fmt.Errorf("estimate the rows of %s: %w", b.table, err))
			}
			if est < 0 { // never analyzed: count once
				if err := w.conn.QueryRow(ctx, "select count(*) from "+b.table.Quoted()+" where "+k+" <= $1", *hi).Scan(&est); err != nil {
					return w.m.wrap(w.mig, statement{}, fmt.Errorf("count the rows of %s: %w", b.table, err))
				}
			}
			w.total = est
		}
	}
	w.sz = newSizer(b.size, w.m.cfg.Batch.Target)
	var total *int64
	if b.keyed() {
		total = &w.total
	} else if b.totalFn != nil {
		est, err := b.totalFn(ctx, w.conn)
		if err != nil {
			return w.m.wrap(w.mig, statement{}, fmt.Errorf("backfill Total: %w", err))
		}
		w.total, total = max(est, 0), &w.total
	}
	if _, err := w.conn.Exec(ctx, "insert into "+w.m.progressTable().Quoted()+` (lane, version, file, checksum, lower_key, upper_key, cursor, total, batch_size, started_at, updated_at)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)
on conflict (lane, version) do update set file = excluded.file, checksum = excluded.checksum, lower_key = excluded.lower_key, upper_key = excluded.upper_key,
  cursor = excluded.cursor, done = 0, total = excluded.total, batches = 0, batch_size = excluded.batch_size, started_at = excluded.started_at,
  updated_at = excluded.updated_at, finished_at = null, throttled = '', health = ''`,
		w.l.Name, w.mig.Version, w.mig.Name, w.mig.Checksum, lower, w.upper, w.cursor, total, w.sz.size, w.m.cfg.Now()); err != nil {
		return w.m.wrap(w.mig, statement{}, fmt.Errorf("record progress: %w", err))
	}
	w.log.Info().Int64("total", w.total).Int("batch_size", w.sz.size).Msg("batched migration started")
	return nil
}

// checkKey checks that the walk's table exists and its key is an integer column with a unique
// index of its own. A failure is permanent and names the file.
func (w *walk) checkKey(ctx context.Context) error {
	b := w.b
	var (
		exists, unique bool
		typ            *string
	)
	err := w.conn.QueryRow(ctx, `select c.oid is not null, format_type(a.atttypid, null),
  coalesce((select bool_or(i.indisunique and i.indnkeyatts = 1 and i.indkey[0] = a.attnum and i.indpred is null)
    from pg_index i where i.indrelid = c.oid), false)
from (select to_regclass($1) as oid) c left join pg_attribute a on a.attrelid = c.oid and a.attname = $2 and a.attnum > 0 and not a.attisdropped`,
		b.table.Quoted(), b.key).Scan(&exists, &typ, &unique)
	if err != nil {
		return w.m.wrap(w.mig, statement{}, fmt.Errorf("look up batch table %s: %w", b.table, err))
	}
	var fault error
	switch {
	case !exists:
		fault = fmt.Errorf("batch table %s does not exist", b.table)
	case typ == nil:
		fault = fmt.Errorf("batch key %q is not a column of %s", b.key, b.table)
	case *typ != "smallint" && *typ != "integer" && *typ != "bigint":
		fault = fmt.Errorf("batch key %q of %s is %s: want an integer column (smallint, integer or bigint)", b.key, b.table, *typ)
	case !unique:
		fault = fmt.Errorf("batch key %q of %s has no unique index of its own: a keyset walk needs one", b.key, b.table)
	}
	if fault != nil {
		return w.m.wrap(w.mig, statement{}, fault)
	}
	return nil
}

// step runs one batch. It returns true when nothing is left to walk. A batch that hits the
// statement timeout is retried with a tenth of its size twice, one that hits the lock timeout
// is retried smaller after a pause three times; then the error names the batch's range.
func (w *walk) step(ctx context.Context) (bool, error) {
	timeouts, lockWaits := 0, 0
	for {
		fin, err := w.batch(ctx)
		if err == nil {
			return fin, nil
		}
		if ctx.Err() != nil {
			return false, err
		}
		var pgErr *pgconn.PgError
		switch {
		case errors.As(err, &pgErr) && pgErr.Code == "57014" && timeouts < 2: // statement_timeout
			timeouts++
			w.sz.shrink()
			w.log.Warn().Int("batch_size", w.sz.size).Msg("a batch hit the statement timeout; retrying it smaller")
		case errors.As(err, &pgErr) && pgErr.Code == "55P03" && lockWaits < 3: // lock_timeout
			lockWaits++
			w.sz.shrink()
			w.setThrottled(ctx, "lock waits: a batch waited longer than the lock timeout")
			if err := backoff.Sleep(ctx, max(w.lastDur, w.m.cfg.Batch.Target)); err != nil {
				return false, err
			}
		default:
			return false, err
		}
	}
}

// batch runs one batch in its own transaction.
func (w *walk) batch(ctx context.Context) (fin bool, err error) {
	b, mig := w.b, w.mig
	if w.b.keyed() && w.upper == nil {
		return true, nil // an empty table
	}
	t0 := time.Now()
	tx, err := w.m.begin(ctx, w.conn)
	if err != nil {
		return false, w.m.wrap(mig, statement{}, fmt.Errorf("begin: %w", err))
	}
	defer func() {
		if err != nil || fin {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			_ = tx.Rollback(rctx)
		}
	}()
	cfg := w.m.cfg.Batch
	if _, err := tx.Exec(ctx, fmt.Sprintf("set local statement_timeout = %d; set local lock_timeout = %d",
		cfg.StatementTimeout.Milliseconds(), cfg.LockTimeout.Milliseconds())); err != nil {
		return false, w.m.wrap(mig, statement{}, err)
	}
	size := w.sz.size
	var (
		paused bool
		n      int64
		next   string
		hi     *int64
		span   string
	)
	if b.keyed() {
		k := pgx.Identifier{b.key}.Sanitize()
		lo, _ := strconv.ParseInt(w.cursor, 10, 64)
		err = tx.QueryRow(ctx, "select max("+k+")::int8, count(*), coalesce((select paused from "+w.m.controlTable().Quoted()+" where lane = $4), false) from (select "+k+" from "+b.table.Quoted()+
			" where "+k+" > $1 and "+k+" <= $2 order by "+k+" limit $3) s", lo, *w.upper, size, w.l.Name).Scan(&hi, &n, &paused)
		if err != nil {
			return false, w.m.wrap(mig, statement{}, fmt.Errorf("find the next batch after %d: %w", lo, err))
		}
		if paused {
			return false, w.pausedErr()
		}
		if n == 0 {
			return true, nil
		}
		span = fmt.Sprintf("batch (%d, %d]", lo, *hi)
		if b.rangeFn != nil {
			err = b.rangeFn(ctx, tx, lo, *hi)
		} else {
			_, err = tx.Exec(ctx, b.sql, lo, *hi)
		}
		if err != nil {
			return false, w.m.wrap(mig, b.stmt, fmt.Errorf("%s: %w", span, err))
		}
		next = strconv.FormatInt(*hi, 10)
	} else {
		if paused, err = w.m.isPaused(ctx, tx, w.l.Name); err != nil {
			return false, w.m.wrap(mig, statement{}, err)
		}
		if paused {
			return false, w.pausedErr()
		}
		var last bool
		next, last, err = b.cursorFn(ctx, tx, w.cursor, size)
		if err != nil {
			return false, w.m.wrap(mig, statement{}, fmt.Errorf("batch after cursor %q: %w", w.cursor, err))
		}
		n = int64(size) // up to size items: what the walk's total counts in
		defer func() {
			if err == nil {
				fin = last
			}
		}()
	}

	// Counters and the cursor commit with the batch's work, under the lane's lease.
	if err = w.l.lock.fence(ctx, tx); err != nil {
		return false, w.m.wrap(mig, statement{}, err)
	}
	now := time.Now()
	if inst := float64(n) / max(now.Sub(w.lastEnd).Seconds(), 1e-6); w.rate == 0 {
		w.rate = inst
	} else {
		w.rate = 0.3*inst + 0.7*w.rate
	}
	tag, err := tx.Exec(ctx, "update "+w.m.progressTable().Quoted()+` set cursor = $3, done = done + $4, batches = batches + 1, batch_size = $5,
  rate_per_s = $6, throttled = $7, health = $8, updated_at = $9 where lane = $1 and version = $2 and cursor = $10`,
		w.l.Name, mig.Version, next, n, size, w.rate, w.throttled, w.health, w.m.cfg.Now(), w.cursor)
	if err == nil && tag.RowsAffected() != 1 {
		err = errors.New("the walk's cursor moved outside this lane's lock")
	}
	if err != nil {
		return false, w.m.wrap(mig, statement{}, fmt.Errorf("record progress: %w", err))
	}
	announce := now.Sub(w.lastAnnounce) >= announceEvery
	if announce {
		if _, err = tx.Exec(ctx, "select pg_notify($1, $2)", w.m.cfg.Channel, w.event(w.done+n).Payload()); err != nil {
			return false, w.m.wrap(mig, statement{}, fmt.Errorf("announce progress: %w", err))
		}
	}
	if err = tx.Commit(ctx); err != nil {
		return false, w.m.wrap(mig, statement{}, fmt.Errorf("commit %s: %w", span, err))
	}
	w.cursor, w.done = next, w.done+n
	if announce {
		w.lastAnnounce = now
	}
	w.lastEnd = time.Now()
	w.lastDur = w.lastEnd.Sub(t0)
	if w.trace.BatchDone != nil {
		w.trace.BatchDone(w.l.Name, mig.Version, n, w.lastDur)
	}
	if b.cursorFn != nil {
		w.sz.observe(size, w.lastDur) // a cursor batch counts as size rows for the sizer
	} else {
		w.sz.observe(int(n), w.lastDur)
	}
	if w.lastEnd.Sub(w.lastLog) >= progressLogEvery {
		w.lastLog = w.lastEnd
		p := w.progress()
		ev := w.log.Info().Int64("done", p.Done).Int64("total", p.Total).Float64("rate_per_s", math.Round(p.RatePerS)).Int("batch_size", w.sz.size)
		if p.Percent != nil {
			ev = ev.Float64("percent", *p.Percent)
		}
		if p.ETASeconds != nil {
			ev = ev.Float64("eta_s", *p.ETASeconds)
		}
		if p.Throttled != "" {
			ev = ev.Str("throttled", p.Throttled)
		}
		ev.Msg("batched migration progress")
	}
	return false, nil
}

func (w *walk) pausedErr() error {
	w.log.Info().Str("cursor", w.cursor).Int64("done", w.done).Msg("lane paused: the batched migration stopped after its last committed batch")
	return fmt.Errorf("lane %q: %s: %w", w.l.Name, w.mig.Name, ErrPaused)
}

// event is the progress notification at done.
func (w *walk) event(done int64) event {
	return event{Lane: w.l.Name, Version: w.mig.Version, Progress: &progressHint{Done: done, Total: w.total, Rate: math.Round(w.rate*10) / 10, Throttled: w.throttled}}
}

// progress is the walk's progress as the applier knows it.
func (w *walk) progress() Progress {
	p := Progress{Lane: w.l.Name, Version: w.mig.Version, File: w.mig.Name, Done: w.done, Total: w.total, RatePerS: w.rate,
		Throttled: w.throttled, Health: w.health, BatchSize: w.sz.size, StartedAt: w.started, UpdatedAt: w.lastEnd}
	p.fill()
	return p
}

// between holds the next batch back: Pause, the nice ratio, and while the database is
// unhealthy (a standby's replay lag over the bound).
func (w *walk) between(ctx context.Context) error {
	cfg := w.m.cfg.Batch
	if d := cfg.Pause + time.Duration(cfg.NiceRatio*float64(w.lastDur)); d > 0 {
		if err := backoff.Sleep(ctx, d); err != nil {
			return err
		}
	}
	if cfg.MaxReplicationLag < 0 {
		return nil
	}
	for held := false; ; held = true {
		reason, health, err := w.lag.check(ctx, w.conn, cfg.MaxReplicationLag)
		if err != nil {
			return w.m.wrap(w.mig, statement{}, err)
		}
		if health != w.health {
			w.health = health
			if health != "" {
				w.log.Warn().Str("health", health).Msg("cannot read the replication lag; batches are not held back for it")
			}
		}
		if reason == "" {
			if w.throttled != "" {
				w.log.Info().Msg("throttle lifted")
				w.setThrottled(ctx, "")
			}
			return nil
		}
		if reason != w.throttled {
			w.log.Warn().Str("throttled", reason).Msg("batches held back")
		}
		if !held && w.trace.BatchThrottled != nil {
			w.trace.BatchThrottled(w.l.Name, w.mig.Version, reason)
		}
		w.setThrottled(ctx, reason)
		if paused, err := w.m.isPaused(ctx, w.conn, w.l.Name); err != nil {
			return w.m.wrap(w.mig, statement{}, err)
		} else if paused {
			return w.pausedErr()
		}
		if err := backoff.Sleep(ctx, time.Second); err != nil {
			return err
		}
	}
}

// setThrottled records why batches are held back, durable and announced at most once a second.
func (w *walk) setThrottled(ctx context.Context, reason string) {
	changed := reason != w.throttled
	w.throttled = reason
	now := time.Now()
	if !changed && now.Sub(w.lastAnnounce) < announceEvery {
		return
	}
	w.lastAnnounce = now
	_, err := w.conn.Exec(ctx, "update "+w.m.progressTable().Quoted()+" set throttled = $3, health = $4, updated_at = $5 where lane = $1 and version = $2; ",
		w.l.Name, w.mig.Version, reason, w.health, w.m.cfg.Now())
	if err == nil {
		_, err = w.conn.Exec(ctx, "select pg_notify($1, $2)", w.m.cfg.Channel, w.event(w.done).Payload())
	}
	if err != nil && ctx.Err() == nil {
		w.log.Warn().Err(err).Msg("could not record the throttle")
	}
}

// lagProbe estimates standbys' replay lag from pg_stat_replication. Besides replay_lag (which
// PostgreSQL updates only when the standby reports), it samples the primary's WAL position on
// every check: a standby whose replay position is behind a sample taken t ago lags at least t.
type lagProbe struct {
	samples []lsnSample
	last    time.Time
	reason  string
	health  string
}

type lsnSample struct {
	at  time.Time
	lsn int64
}

// check returns why batches must wait ("" when they need not) and a health note when the lag
// cannot be read. It queries at most once a second.
func (p *lagProbe) check(ctx context.Context, conn *pgx.Conn, bound time.Duration) (reason, health string, err error) {
	now := time.Now()
	if now.Sub(p.last) < time.Second && p.reason == "" {
		return p.reason, p.health, nil
	}
	p.last = now
	rows, err := conn.Query(ctx, `select pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8, s.pid is not null, coalesce(s.application_name, ''), s.state,
  pg_wal_lsn_diff(s.replay_lsn, '0/0')::int8, extract(epoch from s.replay_lag)::float8
from (select 1) one left join pg_stat_replication s on true`)
	if err != nil {
		return "", "", fmt.Errorf("read replication lag: %w", err)
	}
	type standby struct {
		name      string
		state     *string
		replay    *int64
		replayLag *float64
	}
	var (
		cur      int64
		standbys []standby
	)
	for rows.Next() {
		var s standby
		var present bool
		if err := rows.Scan(&cur, &present, &s.name, &s.state, &s.replay, &s.replayLag); err != nil {
			rows.Close()
			return "", "", fmt.Errorf("read replication lag: %w", err)
		}
		if present {
			standbys = append(standbys, s)
		}
	}
	if err := rows.Err(); err != nil {
		return "", "", fmt.Errorf("read replication lag: %w", err)
	}
	p.samples = append(p.samples, lsnSample{at: now, lsn: cur})
	if len(p.samples) > 3600 {
		p.samples = p.samples[len(p.samples)-3600:]
	}
	p.reason, p.health = "", ""
	var worst time.Duration
	var worstName string
	minReplay := cur
	for _, s := range standbys {
		if s.state == nil {
			p.health = "replication lag unknown: this role may not read pg_stat_replication (grant pg_monitor)"
			continue
		}
		if s.replay == nil {
			continue // connected, nothing replayed yet
		}
		minReplay = min(minReplay, *s.replay)
		var lag time.Duration
		if *s.replay < cur {
			for _, smp := range p.samples {
				if smp.lsn > *s.replay {
					lag = now.Sub(smp.at)
					break
				}
			}
			if s.replayLag != nil {
				lag = max(lag, time.Duration(*s.replayLag*float64(time.Second)))
			}
		}
		if lag > worst {
			worst, worstName = lag, s.name
		}
	}
	// Samples older than every standby's replay position are no longer needed (keep one).
	i := 0
	for i < len(p.samples)-1 && p.samples[i+1].lsn <= minReplay {
		i++
	}
	p.samples = p.samples[i:]
	if worst > bound {
		if worstName == "" {
			worstName = "a standby"
		}
		p.reason = fmt.Sprintf("replication lag %s > %s (%s)", worst.Round(100*time.Millisecond), bound, worstName)
	}
	return p.reason, p.health, nil
}

func deref64(p *int64) int64 {
	if p == nil {
		return 0
	}
	return *p
}
