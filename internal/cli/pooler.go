package cli

import (
	"context"
	"errors"
	"fmt"

	"github.com/multilanes/lanes/migrator"
)

// refuseSharedSessions returns an error when the database URL leads to a pooler in transaction
// or statement mode (migrator.CheckSessions), where a lane's lock would not serialize anything.
// Other errors (the server is down) are left to the command, which reports or retries them.
func refuseSharedSessions(ctx context.Context, c *command, m *migrator.Migrator) error {
	err := m.CheckSessions(ctx)
	if errors.Is(err, migrator.ErrSharedSessions) {
		return fmt.Errorf("%s: %w (PgBouncer: pool_mode = session for the lanes' database, or a second [databases] entry in session mode for lanes)", target(m.ConnConfig()), err)
	}
	if err != nil {
		c.log.Debug().Err(err).Msg("could not check for a transaction pooler")
	}
	return nil
}
