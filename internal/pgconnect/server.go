package pgconnect

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// Server is whether a server takes writes, as one of its sessions sees it.
type Server struct {
	// ReadOnly: the session's transactions are read-only (25006 on any write), because the
	// server is in recovery or default_transaction_read_only is on (for the server, the
	// database or the role).
	ReadOnly bool `json:"read_only"`
	// InRecovery: the server is a hot standby (or a primary still recovering): it takes writes
	// only once promoted.
	InRecovery bool `json:"in_recovery"`
}

// Querier runs one statement: a *pgx.Conn, a *pgxpool.Pool or a pgx.Tx.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// ReadServer asks the server, in one statement, whether it takes writes.
func ReadServer(ctx context.Context, q Querier) (Server, error) {
	var s Server
	err := q.QueryRow(ctx, "select pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'").Scan(&s.InRecovery, &s.ReadOnly)
	if err != nil {
		return Server{}, fmt.Errorf("read whether the server takes writes: %w", err)
	}
	s.ReadOnly = s.ReadOnly || s.InRecovery
	return s, nil
}

// String says what the server is: "writable", "read-only (in recovery: a hot standby)" or
// "read-only (default_transaction_read_only)".
func (s Server) String() string {
	switch {
	case s.InRecovery:
		return "read-only (in recovery: a hot standby)"
	case s.ReadOnly:
		return "read-only (default_transaction_read_only)"
	}
	return "writable"
}
