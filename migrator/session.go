package migrator

import (
	"context"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/session"
)

// noDeadClientCheck says once per Migrator that the server cannot notice a killed client while
// its statement runs, and what takeover bound holds then.
func (m *Migrator) noDeadClientCheck(version int) {
	m.warnOld.Do(func() {
		m.cfg.Logger.Info().Int("server_version_num", version).
			Msg("this PostgreSQL (before 14) has no client_connection_check_interval: when a replica dies while a migration statement runs, " +
				"its session and lane lock live on until that statement ends; another replica takes the lane over at its next check after that")
	})
}

// sessionSetFailed says once per Migrator that the server refused the session settings.
func (m *Migrator) sessionSetFailed(err error) {
	m.setFailed.Store(true)
	m.warnSet.Do(func() {
		m.cfg.Logger.Warn().Err(err).
			Msg("could not set the session settings (client_connection_check_interval, tcp_keepalives_*); a dead replica's lane lock may live on until its statement ends")
	})
}

// restoreSessionSQL returns the statement that sets the session settings again after a RESET
// ALL on conn, or "" when there are none.
func (m *Migrator) restoreSessionSQL(ctx context.Context, pgConn *pgconn.PgConn) (string, error) {
	version, err := session.ServerVersion(ctx, pgConn)
	if err != nil {
		return "", err
	}
	skip := map[string]bool{}
	for _, k := range m.userSet {
		skip[k] = true
	}
	return session.SQL(version, skip), nil
}
