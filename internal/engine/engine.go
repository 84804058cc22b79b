// Package engine carries what package migrator provides to the runtime, the command line and
// the tests of this module without making it library API: connecting the way a Migrator does
// and running a lane on a connection the caller keeps. Package migrator sets Connect when it is
// initialised.
package engine

import (
	"context"

	"github.com/jackc/pgx/v5"
)

// Connect opens a connection the way m, a *migrator.Migrator, opens its own: its
// BeforeConnect hook, its session settings, the next host of a multi-host URL when one answers
// with a FATAL error. Set by package migrator.
var Connect func(ctx context.Context, m any) (*pgx.Conn, error)

// BeforeConnect returns the BeforeConnect hook of m, a *migrator.Migrator, or nil, for the
// connections a Runtime opens on its own (the listener's). Set by package migrator.
var BeforeConnect func(m any) func(context.Context, *pgx.ConnConfig) error

// ApplierLockKey returns a key that every session applying the lane of m, a
// *migrator.Migrator, holds while it applies, computed without a query (see the Migrator's
// lock): trying it tells whether any session applies the lane, at the cost of one statement.
// Set by package migrator.
var ApplierLockKey func(m any, lane string) (int64, error)

// LaneFree reports whether nothing holds the lane of m, a *migrator.Migrator: neither a
// session its advisory lock (tried and released at once) nor a lease row. One statement on q
// (two while the lease table does not exist yet), which may go through a transaction pooler; it
// takes nothing. Set by package migrator.
var LaneFree func(ctx context.Context, m any, q Querier, lane string) (bool, error)

// SessionConnConfig returns a copy of the connection configuration of m, a *migrator.Migrator,
// that reaches the server with a session of its own, for a listener: its Config.Direct when set,
// else its main configuration. Set by package migrator.
var SessionConnConfig func(m any) *pgx.ConnConfig

// Querier runs queries: a *pgx.Conn, a pgx.Tx or a pool.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

type connKey struct{}

// WithConn returns a context that makes a Migrator's TryMigrate run on conn instead of opening
// a connection of its own, for a replica that retries a lane's lock on a timer. The lane's lock
// is released before TryMigrate returns; conn must not be used by anything else meanwhile.
func WithConn(ctx context.Context, conn *pgx.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, conn)
}

// Conn returns the connection WithConn put in ctx, or nil.
func Conn(ctx context.Context) *pgx.Conn {
	c, _ := ctx.Value(connKey{}).(*pgx.Conn)
	return c
}
