package migrator

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/wire"
)

// event and progressHint are the notification payload (see internal/wire).
type (
	event        = wire.Event
	progressHint = wire.ProgressHint
)

// announce sends ev on the channel, best effort, also after ctx was cancelled (a stop).
func (m *Migrator) announce(ctx context.Context, conn *pgx.Conn, ev event) {
	if conn.IsClosed() {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, "select pg_notify($1, $2)", m.cfg.Channel, ev.Payload()); err != nil {
		m.cfg.Logger.Warn().Err(err).Str("lane", ev.Lane).Msg("could not announce the lane's event")
	}
}
