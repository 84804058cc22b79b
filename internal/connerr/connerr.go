// Package connerr shortens connection errors for people: pgx lists every attempt it made, and
// with the default sslmode=prefer it tries each address twice (TLS, then plain), so the same
// refusal is printed twice.
package connerr

import (
	"errors"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// Compact returns err with repeated lines of its message said once, when it holds a
// *pgconn.ConnectError; any other error is returned as it is. errors.Is and errors.As see the
// original error through it.
func Compact(err error) error {
	var ce *pgconn.ConnectError
	if err == nil || !errors.As(err, &ce) {
		return err
	}
	msg := err.Error()
	lines := strings.Split(msg, "\n")
	seen := make(map[string]bool, len(lines))
	kept := lines[:0]
	for _, l := range lines {
		if seen[l] {
			continue
		}
		seen[l] = true
		kept = append(kept, l)
	}
	short := strings.Join(kept, "\n")
	if short == msg {
		return err
	}
	return &compact{msg: short, err: err}
}

type compact struct {
	msg string
	err error
}

func (c *compact) Error() string { return c.msg }
func (c *compact) Unwrap() error { return c.err }
