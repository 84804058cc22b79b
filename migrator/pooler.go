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

// CheckSessions opens two connections at the same time and compares their server sessions
// (pg_backend_pid, read with the simple protocol). A server, or a session-mode pooler, gives
// two live connections two sessions; a transaction-mode pooler hands its idle server session to
// whichever client sends the next transaction, so with an idle pool both get the same one, and
// CheckSessions returns an error wrapping ErrSharedSessions. A pool busy with other clients can
// give different sessions even in transaction mode, so a nil error is evidence, not proof. Run
// it before applying lanes; it costs two short connections. A failure to connect is returned
// wrapped as the connection attempt returned it.
func (m *Migrator) CheckSessions(ctx context.Context) error {
	var pids [2]int32
	var conns [2]*pgx.Conn
	defer func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close(context.WithoutCancel(ctx))
			}
		}
	}()
	for i := range conns {
		c, err := m.connect(ctx)
		if err != nil {
			return err
		}
		conns[i] = c
	}
	for i, c := range conns {
		if err := c.QueryRow(ctx, "select pg_backend_pid()", pgx.QueryExecModeSimpleProtocol).Scan(&pids[i]); err != nil {
			return fmt.Errorf("check server sessions: %w", err)
		}
	}
	if pids[0] == pids[1] {
		return fmt.Errorf("server session %d: %w", pids[0], ErrSharedSessions)
	}
	return nil
}
