package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/backoff"
	"github.com/multilanes/lanes/internal/connerr"
	"github.com/multilanes/lanes/migrator"
)

// defaultRetryTimeout is how long migrate and status keep retrying while no usable database
// answers, when --timeout is not given.
const defaultRetryTimeout = 5 * time.Minute

// retryTimeoutFlag defines the --timeout flag of a one-shot command that retries while no usable
// database answers.
func retryTimeoutFlag(fs *flag.FlagSet, command string) *time.Duration {
	v := durationValue(defaultRetryTimeout)
	fs.Var(&v, "timeout", "while no usable database answers (no server, a failover, a read-only server),\n"+
		command+" retries with backoff for at most `duration` before it exits 4 (0: no retry)")
	return (*time.Duration)(&v)
}

// Backoff between the attempts of a one-shot command while no usable database answers.
const (
	retryMin = 200 * time.Millisecond
	retryMax = 5 * time.Second
)

// unusable reports whether err means that no usable database answered, as opposed to a
// migration or the configuration being wrong: a connection that could not be made or was lost,
// a server shutting down, starting up or full (57P01, 57P02, 57P03, 53300, 08xxx), one that is
// read-only (25006: a standby, or the old primary after a switch-over).
func unusable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	var connErr *pgconn.ConnectError
	if errors.As(err, &connErr) {
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case pgErr.Code == "25006", pgErr.Code == "57P01", pgErr.Code == "57P02", pgErr.Code == "57P03",
			pgErr.Code == "53300", strings.HasPrefix(pgErr.Code, "08"):
			return true
		}
		return false
	}
	return migrator.IsTransient(err) // a network error, a connection closed under a statement
}

// retryable reports whether a one-shot command should try again after err: a transient error
// (migrator.IsTransient) or a read-only server, but not a refused password, a missing database
// or a missing CONNECT privilege, which no retry mends.
func retryable(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "28P01", "28000", "3D000", "42501":
			return false
		case "25006":
			return true
		}
	}
	return migrator.IsTransient(err)
}

// retry runs f until it succeeds or fails with an error that is not transient. While it fails
// with a transient one (see retryable), it tries again with capped exponential backoff, finding
// the new primary through the URL on each attempt, for at most timeout from the start of the
// first failed attempt of the current outage. It says so once per kind of failure (SQLSTATE, or
// a connection error) and once when the database is usable again. An error meaning no usable
// database is returned with exit code ExitNoDatabase.
func (c *command) retry(ctx context.Context, timeout time.Duration, f func(context.Context) error) error {
	var (
		outage  time.Time           // start of the current run of failures
		seen    = map[string]bool{} // kinds of failure already logged
		attempt int
	)
	for {
		began := time.Now()
		err := f(ctx)
		if err == nil {
			if !outage.IsZero() {
				c.log.Info().Int("attempts", attempt+1).Float64("outage_s", time.Since(outage).Seconds()).Msg("database usable again")
			}
			return nil
		}
		if ctx.Err() != nil {
			return err
		}
		if !retryable(err) {
			return noDatabase(err)
		}
		if outage.IsZero() {
			outage = began // the outage counts from the attempt that met it
		}
		left := timeout - time.Since(outage)
		if left <= 0 {
			return noDatabase(fmt.Errorf("gave up after retrying for %s (--timeout %s): %w",
				time.Since(outage).Round(time.Millisecond), timeout, err))
		}
		wait := min(backoff.Exponential(attempt, retryMin, retryMax), left)
		if kind := errorKind(err); !seen[kind] {
			seen[kind] = true
			c.log.Warn().Err(connerr.Compact(err)).Float64("timeout_left_s", left.Seconds()).
				Msg("no usable database (a failover or restart?): retrying with backoff")
		}
		attempt++
		if err := backoff.Sleep(ctx, wait); err != nil {
			return fmt.Errorf("stopped while retrying: %w", err)
		}
	}
}

// noDatabase gives err the exit code ExitNoDatabase when it means that no usable database
// answered; other errors (a failed migration, drift) keep ExitError.
func noDatabase(err error) error {
	if unusable(err) {
		return &exitError{code: ExitNoDatabase, err: err}
	}
	return err
}

// errorKind groups errors for logging once per kind: the SQLSTATE, else "connection".
func errorKind(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return "connection"
}
