package cli

import (
	"context"
	"errors"
	"fmt"

	"github.com/multilanes/lanes/migrator"
)

// refuseSharedSessions returns an error when the database URL leads to a pooler in transaction
// or statement mode (migrator.CheckSessions), where a lane's lock would not serialize anything.
// A failure to connect is the command's own (it would make the same attempt next), returned
// as connect returns it, so an unreachable server costs one connect timeout, not two.
func refuseSharedSessions(ctx context.Context, c *command, m *migrator.Migrator) error {
	err := m.CheckSessions(ctx)
	switch {
	case errors.Is(err, migrator.ErrSharedSessions):
		return fmt.Errorf("%s: %w (PgBouncer: pool_mode = session for the lanes' database, or a second [databases] entry in session mode for lanes)", target(m.ConnConfig()), err)
	case err != nil:
		return fmt.Errorf("connect to %s: %w", target(m.ConnConfig()), err)
	}
	return nil
}
