package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/migrator"
)

// poolMode reads LANES_POOL_MODE: "transaction" (the database URL leads through a pooler in
// transaction or statement mode), "session" (it does not: no detection), or "" (detect).
func (c *command) poolMode() (string, error) {
	switch v := strings.ToLower(strings.TrimSpace(c.env.getenv("LANES_POOL_MODE"))); v {
	case "", "detect":
		return "", nil
	case "transaction", "statement":
		return "transaction", nil
	case "session", "none", "direct":
		return "session", nil
	default:
		return "", fmt.Errorf("invalid LANES_POOL_MODE %q: want transaction, session or detect", v)
	}
}

// directConnConfig parses LANES_DIRECT_URL, nil when unset.
func (c *command) directConnConfig() (*pgx.ConnConfig, error) {
	u := strings.TrimSpace(c.env.getenv("LANES_DIRECT_URL"))
	if u == "" {
		return nil, nil
	}
	cfg, err := pgx.ParseConfig(u)
	if err != nil {
		return nil, fmt.Errorf("invalid LANES_DIRECT_URL: %s", redact(err.Error(), u))
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = defaultConnectTimeout
	}
	return cfg, nil
}

// forPooler returns m, or a Migrator built again for a transaction pooler when the database URL
// leads through one: LANES_POOL_MODE says so, or, when it is unset, migrator.CheckSessions finds
// two connections sharing one server session. Through a transaction pooler the lane locks are
// timed leases (or, with LANES_DIRECT_URL, session locks on the direct connection) and queries
// keep no prepared statements; the log says so once. Any failure of the check itself (the
// server is down or silent) is left to the command, which reports it or retries it as it would
// anyway; the check's own attempt is bounded by checkSessionsTimeout so that an unreachable
// server does not cost a second full connect timeout.
func (c *command) forPooler(ctx context.Context, m *migrator.Migrator) (*migrator.Migrator, error) {
	mode, err := c.poolMode()
	if err != nil || mode != "" || c.pooled {
		return m, err
	}
	cctx, cancel := context.WithTimeout(ctx, checkSessionsTimeout)
	defer cancel()
	err = m.CheckSessions(cctx)
	switch {
	case errors.Is(err, migrator.ErrSharedSessions):
		c.pooled = true
		ev := c.log.Info().Str("target", target(m.ConnConfig()))
		if c.env.getenv("LANES_DIRECT_URL") != "" {
			ev.Msg("the database URL leads through a pooler in transaction mode: lanes are applied and notifications heard on LANES_DIRECT_URL; everything else goes through the pooler")
		} else {
			ev.Msg("the database URL leads through a pooler in transaction mode: lane locks are timed leases, and notifications are replaced by polling (set LANES_DIRECT_URL to a direct connection to keep them)")
		}
		return c.migrator()
	case err != nil:
		c.log.Debug().Err(err).Msg("could not check for a transaction pooler")
	}
	return m, nil
}

// checkSessionsTimeout bounds the transaction-pooler check.
const checkSessionsTimeout = 2 * time.Second
