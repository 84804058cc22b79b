package migrator

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// ErrSharedSessions is wrapped by CheckSessions when two connections of the same client get
// the same server session: the connection goes through a pooler in transaction or statement
// mode (PgBouncer's pool_mode = transaction).
var ErrSharedSessions = errors.New("two connections got the same server session: the connection goes through a pooler in transaction or statement mode, where a lane's session advisory lock lands on a server connection other clients then use and LISTEN hears nothing; connect directly or through a session-mode pool")

// CheckSessions tells whether the connection configuration leads through a pooler in
// transaction or statement mode. It connects and compares the backend pid the server announced
// at connect time (BackendKeyData) with pg_backend_pid(): equal on a server's own session, so it
// returns nil after one short connection. A pooler such as PgBouncer announces a key of its own:
// CheckSessions then opens a second connection and reads both connections' server sessions
// (pg_backend_pid, simple protocol), ten times. A session-mode pooler gives two live
// connections two sessions for life; a transaction-mode pooler hands its idle server session
// to whichever client sends the next transaction, so both get the same one, or, kept busy by
// other clients, moves a connection from one session to another: either returns an error
// wrapping ErrSharedSessions. A pool could still give each connection one session of its own
// ten times in a row in transaction mode, so a nil error is evidence, not proof: say so in the configuration (Config.TransactionPooler) when you know. A failure to
// connect is returned wrapped as the connection attempt returned it.
func (m *Migrator) CheckSessions(ctx context.Context) error {
	var conns [2]*pgx.Conn
	defer func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close(context.WithoutCancel(ctx))
			}
		}
	}()
	pid := func(c *pgx.Conn) (int32, error) {
		var p int32
		if err := c.QueryRow(ctx, "select pg_backend_pid()", pgx.QueryExecModeSimpleProtocol).Scan(&p); err != nil {
			return 0, fmt.Errorf("check server sessions: %w", err)
		}
		return p, nil
	}
	for i := range conns {
		c, err := m.connectWith(ctx, m.connConfig, true) // no cancel request: it may be a pooler
		if err != nil {
			return err
		}
		conns[i] = c
		if i == 0 {
			p, err := pid(c)
			if err != nil {
				return err
			}
			if uint32(p) == c.PgConn().PID() {
				return nil // the server's own session: no pooler in between
			}
		}
	}
	// Through a session-mode pooler each connection keeps its server session for life. So two
	// connections sharing one (an idle transaction pool hands its most recent server session to
	// the next client), or one connection whose session changes between statements (a pool
	// kept busy by other clients, such as replicas starting together), both prove a transaction
	// pooler.
	var first [2]int32
	for round := range 10 {
		var pids [2]int32
		for i, c := range conns {
			p, err := pid(c)
			if err != nil {
				return err
			}
			pids[i] = p
			if round == 0 {
				first[i] = p
			} else if p != first[i] {
				return fmt.Errorf("one connection's server session moved from %d to %d: %w", first[i], p, ErrSharedSessions)
			}
		}
		if pids[0] == pids[1] {
			return fmt.Errorf("server session %d: %w", pids[0], ErrSharedSessions)
		}
	}
	return nil
}
