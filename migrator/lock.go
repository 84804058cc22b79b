package migrator

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// laneLock is a lane's lock. It has two forms, chosen per Migrator (see Config.TransactionPooler):
//
//   - On a session (a direct connection, or a session-mode pool), a session-level advisory lock
//     on the dedicated connection that applies the lane, plus a session lease row pinned to that
//     session (it holds as long as the advisory lock does). The server frees the advisory lock
//     the moment the session ends, so a killed applier is taken over within about a second. The
//     row also carries a heartbeat the applier renews (every SilenceBound/3, on a connection
//     of its own): a session whose heartbeat expired while it still holds the lock (an applier
//     cut off behind a middlebox that keeps its sockets open) is ended by a waiting replica
//     (see endSilentHolder).
//   - Through a transaction pooler, where a session lock would land on a server connection
//     other clients then use, a timed lease row only: taken and renewed in short transactions
//     (every LeaseTTL/3, on a connection of its own), taken over once it has expired.
//
// Either way the lease row carries an epoch that moves on with every new holder, and every
// transaction that records an applier's progress or a version checks it (fence), so an applier
// that lost the lane can never commit past the loss. The advisory lock is taken with
// pg_try_advisory_lock only: a session blocked in pg_advisory_lock holds a snapshot, and a CREATE
// INDEX CONCURRENTLY run by the holder would wait for it forever; the lease is taken by one
// INSERT ... ON CONFLICT that waits at most for another session's short lease statement. A lane
// may have two advisory keys (see loadedLane.lockKeys): the lock is held when both are, and one
// attempt takes both or neither.
type laneLock struct {
	m     *Migrator
	lane  string
	conn  *pgx.Conn
	keys  []int64 // one or two; keys[0] also keys the lease row
	timed bool    // a timed lease without a session lock (through a transaction pooler)
	epoch int64   // the lease's epoch while held; 0 when not held
	renew *renewer
}

// newLaneLock returns the lock of the lane whose version table resolved to r, taken on conn.
func (m *Migrator) newLaneLock(conn *pgx.Conn, l *loadedLane, r resolvedTable) *laneLock {
	return &laneLock{m: m, lane: l.Name, conn: conn, keys: l.lockKeys(r), timed: m.timedLease()}
}

// tryLock makes one attempt to take the lock. The lease (timed, or a session lease's heartbeat)
// starts being renewed; lost is called (once, from another goroutine) if it is lost all the
// same. lost may be nil.
func (l *laneLock) tryLock(ctx context.Context, lost func()) (bool, error) {
	if err := l.m.ensureLeaseTable(ctx, l.conn); err != nil {
		return false, err
	}
	if l.timed {
		epoch, err := l.acquireLease(ctx, false)
		if err != nil || epoch == 0 {
			return false, err
		}
		l.epoch = epoch
		if lost == nil {
			lost = func() {}
		}
		l.renew = l.startRenewer(ctx, lost)
		return true, nil
	}
	got, err := l.tryAdvisory(ctx)
	if err != nil || !got {
		return false, err
	}
	epoch, err := l.acquireLease(ctx, true)
	if err == nil && epoch == 0 {
		// A timed lease holds the lane (an applier through a transaction pooler).
		err = l.unlockAdvisory(ctx)
		return false, err
	}
	if err != nil {
		_ = l.unlockAdvisory(ctx)
		return false, err
	}
	l.epoch = epoch
	if lost == nil {
		lost = func() {}
	}
	l.renew = l.startRenewer(ctx, lost)
	return true, nil
}

func (l *laneLock) tryAdvisory(ctx context.Context) (bool, error) {
	var ok bool
	var err error
	if len(l.keys) == 1 {
		err = l.conn.QueryRow(ctx, "select pg_try_advisory_lock($1)", l.keys[0]).Scan(&ok)
	} else {
		// CASE evaluates its branches in order: the second key is tried only once the first is
		// held, and the first is released when the second is not free.
		err = l.conn.QueryRow(ctx, `select case when pg_try_advisory_lock($1) then
  case when pg_try_advisory_lock($2) then true else not pg_advisory_unlock($1) end
else false end`, l.keys[0], l.keys[1]).Scan(&ok)
	}
	if err != nil {
		return false, fmt.Errorf("try advisory lock %d: %w", l.keys[0], err)
	}
	return ok, nil
}

// unlock releases the lock. It runs on a context detached from ctx's cancellation, bounded by
// its own timeout, because it must happen after the caller gave up too. If the connection is
// gone the server has already released the session lock, and the lease row with it.
func (l *laneLock) unlock(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	l.renew.stop()
	l.renew = nil
	if l.conn.IsClosed() {
		return nil
	}
	err := l.releaseLease(ctx, l.conn)
	l.epoch = 0
	if l.timed {
		return err
	}
	return errors.Join(err, l.unlockAdvisory(ctx))
}

func (l *laneLock) unlockAdvisory(ctx context.Context) error {
	q, args := "select pg_advisory_unlock($1)", []any{l.keys[0]}
	if len(l.keys) == 2 {
		q, args = "select pg_advisory_unlock($1), pg_advisory_unlock($2)", []any{l.keys[0], l.keys[1]}
	}
	if _, err := l.conn.Exec(ctx, q, args...); err != nil {
		return fmt.Errorf("release advisory lock %d: %w", l.keys[0], err)
	}
	return nil
}

// lockKey derives an advisory lock key from the table name as written: "multi-lanes:" and the
// name, hashed. A lane's lock uses the key of its resolved, schema-qualified version table (see
// resolveTables), so two lanes share a lock only when they share a version table, however it is
// spelt. The key differs from tern's constant lock number, so a lane never waits for tern's lock,
// nor tern for a lane's.
func (t tableName) lockKey() int64 {
	h := fnv.New64a()
	h.Write([]byte("multi-lanes:" + t.String()))
	return int64(h.Sum64())
}

// lockKeys returns the advisory lock keys of a lane whose version table resolved to r: the key
// of the qualified name, then the key of the name as configured when it differs (the only key of
// releases before version tables were resolved), so that a replica of such a release and one of
// this release never apply a lane at the same time.
func (l *loadedLane) lockKeys(r resolvedTable) []int64 {
	keys := []int64{r.table.lockKey()}
	if legacy := l.table.lockKey(); legacy != keys[0] {
		keys = append(keys, legacy)
	}
	return keys
}

// setupLockKey serialises creating the shared history table across lanes and processes.
var setupLockKey = func() int64 {
	h := fnv.New64a()
	h.Write([]byte("multi-lanes:setup"))
	return int64(h.Sum64())
}()

// LockKey returns the key of the lane's session-level advisory lock, for operators who want to
// see who holds it (pg_locks: classid = key>>32, objid = key&0xffffffff, objsubid = 1). The key
// is derived from the lane's version table as resolved by the session q (schema-qualified, see
// Migrate), so it costs one query. A lane whose version table is configured without the schema
// it resolves to is also locked with the key of the name as configured, the only key of earlier
// releases; an applier holds both.
func (m *Migrator) LockKey(ctx context.Context, q Querier, lane string) (int64, error) {
	l, ok := m.byName[lane]
	if !ok {
		return 0, fmt.Errorf("lane %q: %w", lane, ErrUnknownLane)
	}
	tables, _, err := m.resolveTables(ctx, q)
	if err != nil {
		return 0, err
	}
	return tables[l.index].table.lockKey(), nil
}

// applierLockKey returns a key that every session applying the lane holds while it applies,
// computed without a query: the key of the version table's name as configured (which an applier
// of this release holds together with LockKey's, and an earlier release alone). Trying it
// tells whether any session with the same lane configuration applies the lane, at the cost of
// one statement, as a waiting replica's periodic check needs; it is not the whole lock, which
// LockKey gives.
func (m *Migrator) applierLockKey(lane string) (int64, error) {
	l, ok := m.byName[lane]
	if !ok {
		return 0, fmt.Errorf("lane %q: %w", lane, ErrUnknownLane)
	}
	return l.table.lockKey(), nil
}

// LockHolder is a session holding a lane's lock, as pg_stat_activity shows it.
type LockHolder struct {
	Lane string `json:"lane"`
	// PID is the holding backend's process id on the server (pg_terminate_backend ends it).
	PID int32 `json:"pid"`
	// ApplicationName is the session's application_name: lanes/<host>/<pid> of the replica
	// unless its connection sets another.
	ApplicationName string `json:"application_name"`
	// ClientAddr is the client's address, "local socket" for a Unix-domain socket.
	ClientAddr string `json:"client_addr"`
	// ConnectedAt is when the holding session connected: it holds the lock since then or later
	// (a replica may wait for a lane on the session it then applies it with).
	ConnectedAt *time.Time `json:"connected_at"`
	// Hidden is set when the reading role may not see the session's details (PostgreSQL shows
	// them to the same role, superusers and pg_read_all_stats): only PID is known then.
	Hidden bool `json:"hidden,omitempty"`
}

// LockHolders returns the sessions holding the lanes' locks, by lane; a lane nobody holds is
// absent. It takes no lock and costs two round trips (the version tables resolved, as in
// Status, then one query over pg_locks and pg_stat_activity).
func (m *Migrator) LockHolders(ctx context.Context, q Querier) (map[string]LockHolder, error) {
	tables, _, err := m.resolveTables(ctx, q)
	if err != nil {
		return nil, err
	}
	var keys []string
	for i, l := range m.lanes {
		for j, key := range l.lockKeys(tables[i]) {
			keys = append(keys, fmt.Sprintf("(%d, %d, %d::int8, %d::int8)", i, j, uint32(uint64(key)>>32), uint32(uint64(key))))
		}
	}
	rows, err := q.Query(ctx, `select distinct on (k.i) k.i, l.pid, a.pid is null or a.backend_start is null,
  coalesce(a.application_name, ''), case when a.client_addr is not null then host(a.client_addr) when a.backend_start is not null then 'local socket' else '' end,
  a.backend_start
from (values `+strings.Join(keys, ", ")+`) k(i, j, c, o)
join pg_locks l on l.locktype = 'advisory' and l.granted and l.objsubid = 1
  and l.database = (select oid from pg_database where datname = current_database())
  and l.classid::int8 = k.c and l.objid::int8 = k.o
left join pg_stat_activity a on a.pid = l.pid
where l.pid is not null
order by k.i, k.j`)
	if err != nil {
		return nil, fmt.Errorf("read lane lock holders: %w", err)
	}
	out := map[string]LockHolder{}
	for rows.Next() {
		var (
			i int
			h LockHolder
		)
		if err := rows.Scan(&i, &h.PID, &h.Hidden, &h.ApplicationName, &h.ClientAddr, &h.ConnectedAt); err != nil {
			return nil, fmt.Errorf("read lane lock holders: %w", err)
		}
		h.Lane = m.lanes[i].Name
		out[h.Lane] = h
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read lane lock holders: %w", err)
	}
	return out, nil
}
