package migrator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgconn"
)

// ErrLocked is returned by TryMigrate when another session holds the lane's lock.
var ErrLocked = errors.New("lane is locked by another session")

// ErrFailedBefore is wrapped by the *MigrationError TryMigrate returns instead of re-running a
// migration whose last attempt failed permanently, unchanged since.
var ErrFailedBefore = errors.New("failed before and unchanged since; not retried")

// ErrUnknownLane is returned for a lane name the Migrator was not given.
var ErrUnknownLane = errors.New("unknown lane")

// LoadError reports a lane that cannot be loaded: a bad name, a gap, a duplicate, a template
// error. Nothing has been applied when it is returned.
type LoadError struct {
	Lane string // the lane's name
	File string // the file at fault, when there is one
	Err  error  // the cause
}

func (e *LoadError) Error() string {
	if e.File != "" {
		return fmt.Sprintf("lane %q: %s: %v", e.Lane, e.File, e.Err)
	}
	return fmt.Sprintf("lane %q: %v", e.Lane, e.Err)
}

// Unwrap returns the cause.
func (e *LoadError) Unwrap() error { return e.Err }

// MigrationError reports a migration that failed. A migration run in a transaction has been
// rolled back; a disable-tx migration may have applied the statements before Statement.
type MigrationError struct {
	Lane      string // the lane's name
	Version   int32  // the version the migration would have reached
	File      string // the file name, or NNN_name.go for a Go migration
	Statement string // the failing SQL statement, when the error came from one
	Line      int    // line of the file where the error is (0: unknown)
	SQLState  string // the SQLSTATE of a PostgreSQL error, when there is one
	Err       error  // the cause

	offset int // 1 + the byte offset of the error in Statement; 0: unknown
}

func (e *MigrationError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "lane %q: %s", e.Lane, e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, " line %d", e.Line)
	}
	fmt.Fprintf(&b, ": %v", e.Err)
	if e.Statement != "" {
		fmt.Fprintf(&b, "; statement: %s", abbreviate(e.Statement, 200))
	}
	return b.String()
}

// Unwrap returns the cause.
func (e *MigrationError) Unwrap() error { return e.Err }

// Transient reports whether the migration may succeed if simply run again.
func (e *MigrationError) Transient() bool { return IsTransient(e.Err) }

// IsTransient reports whether err is worth retrying unchanged: serialization failures,
// deadlocks, lock and statement timeouts from lock_timeout, lost or refused connections, server
// shutdowns, and writes refused by a read-only server (a standby, or the old primary after a
// switch-over: a retry reaches the new primary). Syntax errors, missing objects and constraint violations are permanent.
// Context cancellation is not transient: the caller asked to stop.
func IsTransient(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return transientSQLState(pgErr.Code)
	}
	var netErr net.Error
	if errors.As(err, &netErr) || pgconn.SafeToRetry(err) || pgconn.Timeout(err) {
		return true
	}
	var connErr *pgconn.ConnectError
	return errors.As(err, &connErr) || strings.Contains(err.Error(), "conn closed") || strings.Contains(err.Error(), "unexpected EOF")
}

// transientSQLState reports whether an error with this SQLSTATE is worth retrying unchanged.
func transientSQLState(code string) bool {
	switch {
	case strings.HasPrefix(code, "40"), // serialization_failure, deadlock_detected
		strings.HasPrefix(code, "08"), // connection exceptions
		code == "55P03",               // lock_not_available (lock_timeout)
		code == "57P01",               // admin_shutdown
		code == "57P02",               // crash_shutdown
		code == "57P03",               // cannot_connect_now
		code == "53300",               // too_many_connections
		code == "25006":               // read_only_sql_transaction: a standby, or the old primary after a switch-over
		return true
	}
	return false
}

func abbreviate(s string, n int) string {
	if len(s) > 8*n { // only the start is shown: do not collapse the spaces of a huge statement
		cut := 8 * n
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut]
	}
	s = strings.Join(strings.Fields(s), " ")
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}
