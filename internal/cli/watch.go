package cli

import (
	"context"
	"fmt"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/lanestate"
	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

// runWatch redraws the status table live until ctx is cancelled: it LISTENs on the channel,
// reads the lanes' state on every (re)connect and lane event, and updates a lane's progress
// from its announcements alone (no query). On a terminal each drawing replaces the last.
func runWatch(ctx context.Context, c *command, m *migrator.Migrator) error {
	tu, err := c.tuning()
	if err != nil {
		return err
	}
	var (
		mu    sync.Mutex
		lanes []migrator.LaneStatus
	)
	draw := func() error {
		if c.env.terminal {
			fmt.Fprint(c.env.stdout, "\x1b[H\x1b[2J")
		} else {
			fmt.Fprintln(c.env.stdout)
		}
		fmt.Fprintln(c.env.stdout, c.env.now().UTC().Format("15:04:05"))
		return writeStatusTable(c.env.stdout, lanes)
	}
	handler := func(ctx context.Context, conn *pgx.Conn, n *pgconn.Notification) error {
		mu.Lock()
		defer mu.Unlock()
		if n != nil {
			if ev, err := wire.Parse(n.Payload); err == nil && ev.Progress != nil {
				for i := range lanes {
					if lanes[i].Name == ev.Lane && ev.Version == lanes[i].Version+1 {
						file := ""
						if lanes[i].Progress != nil {
							file = lanes[i].Progress.File
						}
						lanes[i].Progress = lanestate.Progress(*ev.Progress, ev.Lane, ev.Version, file, c.env.now())
						if lanes[i].State == migrator.StatePending || lanes[i].State == migrator.StateFailed {
							lanes[i].State, lanes[i].Locked = migrator.StateRunning, true // someone applies it
						}
						return draw()
					}
				}
			} else if err != nil {
				return nil // not a lanes event
			}
		}
		st, err := m.Status(ctx, conn)
		if err != nil {
			return err
		}
		lanes = st
		return draw()
	}
	ncfg := tu.notifierConfig()
	ncfg.Channel = m.Channel()
	ncfg.Logger = c.log
	l, err := notifier.New(engine.SessionConnConfig(m), ncfg, handler)
	if err != nil {
		return err
	}
	if err := l.Start(ctx); err != nil {
		return err
	}
	defer l.Stop()
	<-ctx.Done()
	return nil
}
