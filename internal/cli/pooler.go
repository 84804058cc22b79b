package cli

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/multilanes/lanes/migrator"
)

// refuseSharedSessions returns an error when the database URL leads to a pooler in transaction
// or statement mode (migrator.CheckSessions), where a lane's lock would not serialize anything.
// Any other failure (the server is down or silent) is left to the command, which reports it or
// retries it as it would anyway; the check's own attempt is bounded by checkSessionsTimeout so
// that an unreachable server does not cost a second full connect timeout.
func refuseSharedSessions(ctx context.Context, c *command, m *migrator.Migrator) error {
	cctx, cancel := context.WithTimeout(ctx, checkSessionsTimeout)
	defer cancel()
	err := m.CheckSessions(cctx)
	switch {
	case errors.Is(err, migrator.ErrSharedSessions):
		return fmt.Errorf("%s: %w (PgBouncer: pool_mode = session for the lanes' database, or a second [databases] entry in session mode for lanes)", target(m.ConnConfig()), err)
	case err != nil:
		c.log.Debug().Err(err).Msg("could not check for a transaction pooler")
	}
	return nil
}

// checkSessionsTimeout bounds the transaction-pooler check.
const checkSessionsTimeout = 2 * time.Second
