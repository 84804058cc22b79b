package migrator

// A stalled lane connection: the applier's own connection gone silent while the connection
// renewing its heartbeat still flows (a middlebox that lost one connection's state, a pooler
// stuck on one client). The heartbeat alone would keep the lane held forever; the renewer
// compares what the client waits for with what the server's session does, and ends the
// session when the two disagree for longer than the silence bound.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// clockBase is the origin of watchedConn's times: durations from it are on the monotonic clock.
var clockBase = time.Now()

// watchedConn is a connection to the server that records when the client last began to send
// and last received bytes, so that how long the client has been waiting for an answer is known
// without touching the connection (which belongs to the goroutine running the migration).
type watchedConn struct {
	net.Conn
	wrote atomic.Int64 // time since clockBase when the last write began, ns
	read  atomic.Int64 // time since clockBase when the last read returned bytes, ns
}

// Write records the time before sending: an answer read while a long write is under way (pgconn
// reads in the background then) is later than it, so the client is not taken to be waiting.
func (c *watchedConn) Write(b []byte) (int, error) {
	c.wrote.Store(int64(time.Since(clockBase)))
	return c.Conn.Write(b)
}

func (c *watchedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.read.Store(int64(time.Since(clockBase)))
	}
	return n, err
}

// awaiting returns how long the client has been waiting for an answer: the time since it last
// sent something when it has received nothing since; 0 when it is not waiting.
func (c *watchedConn) awaiting() time.Duration {
	wrote, read := c.wrote.Load(), c.read.Load()
	if wrote == 0 || read >= wrote {
		return 0
	}
	return time.Since(clockBase) - time.Duration(wrote)
}

// watchConnections makes every connection cfg opens a watchedConn, after TLS and after the
// caller's own AfterNetConnect.
func watchConnections(cfg *pgx.ConnConfig) {
	after := cfg.AfterNetConnect
	cfg.AfterNetConnect = func(ctx context.Context, pc *pgconn.Config, conn net.Conn) (net.Conn, error) {
		if after != nil {
			c, err := after(ctx, pc, conn)
			if err != nil {
				return nil, err
			}
			conn = c
		}
		return &watchedConn{Conn: conn}, nil
	}
}

// watched returns conn's watchedConn, or nil for a connection this Migrator did not open.
// Call it on the goroutine that owns conn.
func watched(conn *pgx.Conn) *watchedConn {
	if conn == nil || conn.PgConn() == nil {
		return nil
	}
	w, _ := conn.PgConn().Conn().(*watchedConn)
	return w
}

// endStalledSQL ends the session of a session lease ($1 key, $2 epoch) when that session has
// been idle (in a transaction or not) for longer than $3 ms while it still holds the lane's
// advisory lock, and returns its state and for how long, in seconds. It returns no row when
// the session is busy, or was idle for less, or no longer holds the lane.
func (l *laneLock) endStalledSQL() string {
	return `select a.state, extract(epoch from clock_timestamp() - a.state_change)::float8, pg_terminate_backend(a.pid)
from ` + l.m.leaseTable().Quoted() + ` ls
join pg_stat_activity a on a.pid = ls.session_pid
where ls.key = $1 and ls.epoch = $2
  and a.state in ('idle', 'idle in transaction', 'idle in transaction (aborted)')
  and a.state_change < clock_timestamp() - $3::int8 * interval '1 millisecond'
  and exists (select 1 from pg_locks
    where locktype = 'advisory' and granted and pid = ls.session_pid and database = (select oid from pg_database where datname = current_database())
      and (classid::int8 << 32 | objid::int8) = ls.key and objsubid = 1)`
}

// endIfStalled is called by the renewer of a session lease when the applier's connection has
// been waiting for an answer for longer than bound. When the server's session of the lane has
// been idle for longer than bound too, the request or its answer was lost on the way (the
// session would be active if it ran the statement): the renewer ends that session, which frees
// the lane for another replica at once and rolls its transaction back, and reports true. A
// statement the server is still running (active, waiting on a lock included) is never ended.
func (l *laneLock) endIfStalled(ctx context.Context, conn *pgx.Conn, waited, bound time.Duration) (bool, error) {
	var (
		state string
		idle  float64
		ended bool
	)
	err := conn.QueryRow(ctx, l.endStalledSQL(), l.keys[0], l.epoch, bound.Milliseconds()).Scan(&state, &idle, &ended)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look for a stalled lane session: %w", err)
	}
	if !ended {
		return false, nil
	}
	l.m.cfg.Logger.Warn().Str("lane", l.lane).Int64("epoch", l.epoch).Float64("waited_s", waited.Seconds()).
		Str("server_state", state).Float64("server_idle_s", idle).Float64("silence_bound_s", bound.Seconds()).
		Msg("this replica's connection applying the lane went silent (the client waits for an answer while the server's session sits idle) while its heartbeat's did not: ended that session so that another replica can take the lane over; stopping this run")
	return true, nil
}
