package cli

import (
	"context"
	"flag"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/lanestate"
	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

func waitFlags(fs *flag.FlagSet) commandBody {
	lane := fs.String("lane", "", "the `lane` to wait for (required)")
	version := fs.Int("version", -1, "the `version` to reach (default: the lane's latest known to this binary)")
	var timeoutFlag durationValue
	fs.Var(&timeoutFlag, "timeout", "give up after `duration`, such as 30s or 5m (default 0: no limit)")
	timeout := (*time.Duration)(&timeoutFlag)
	return func(ctx context.Context, c *command, args []string) error {
		switch {
		case len(args) > 0:
			return usageErrorf("unexpected arguments %q", args)
		case *lane == "":
			return usageErrorf("--lane is required")
		case *version < -1 || *version > 1<<31-1:
			return usageErrorf("--version %d is out of range", *version)
		case *timeout < 0:
			return usageErrorf("--timeout must not be negative")
		}
		return runWait(ctx, c, *lane, *version, *timeout)
	}
}

// runWait blocks until the lane reaches the version, listening on the NOTIFY channel and
// re-reading the version tables on every notification (and on every reconnect). It applies
// nothing.
func runWait(ctx context.Context, c *command, lane string, version int, timeout time.Duration) error {
	tu, err := c.tuning()
	if err != nil {
		return err
	}
	m, err := c.migrator()
	if err != nil {
		return err
	}
	if m, err = c.forPooler(ctx, m); err != nil {
		return err
	}
	lanes := m.Lanes()
	idx := slices.IndexFunc(lanes, func(l migrator.LaneInfo) bool { return l.Name == lane })
	if idx < 0 {
		var names []string
		for _, l := range lanes {
			names = append(names, l.Name)
		}
		return usageErrorf("unknown lane %q (lanes: %s)", lane, strings.Join(names, ", "))
	}
	info := lanes[idx]
	want := info.Latest
	if version >= 0 {
		want = int32(version)
	}
	wctx, cancel := ctx, context.CancelFunc(func() {})
	if timeout > 0 {
		wctx, cancel = context.WithTimeout(ctx, timeout)
	}
	defer cancel()
	timedOut := func(at string) error {
		return &exitError{code: ExitTimeout, err: fmt.Errorf("timed out after %s: lane %q %s, waiting for version %d", timeout, lane, at, want)}
	}

	// The handler runs on the listener's goroutine; it keeps only the newest state in updates,
	// so it never blocks.
	updates := make(chan migrator.LaneStatus, 1)
	send := func(st migrator.LaneStatus) {
		select {
		case <-updates:
		default:
		}
		updates <- st
	}
	// holder is the backend that held the lane's lock at the last read of it (0: none or
	// unknown). PostgreSQL names the backend that sent a notification and no client can forge
	// that, so the version that backend announces is what it committed: believed without a
	// read, as a replica does (see app). Anything else is only a hint to read the status.
	var holder int32
	handler := func(ctx context.Context, conn *pgx.Conn, n *pgconn.Notification) error {
		readHolder := n == nil // (re)connected: read the status and who holds the lane
		if n != nil {
			ev, err := wire.Parse(n.Payload)
			switch {
			case err != nil:
				return nil // not a lanes event: nothing to re-read
			case ev.Lane != lane || ev.Progress != nil:
				return nil // another lane's news, or progress: the lane's version did not move
			case (ev.State == wire.Applied || ev.State == wire.Done) && holder != 0 && uint32(holder) == n.PID:
				send(migrator.LaneStatus{Name: lane, Version: ev.Version, Latest: info.Latest, Locked: ev.State == wire.Applied})
				return nil
			case ev.State == wire.Released:
				readHolder = true // another session will take the lane
			}
		}
		st, err := m.Status(ctx, conn)
		if err != nil {
			return err
		}
		if lst := st[idx]; lst.Version < want && (readHolder || (lst.Locked && holder == 0)) {
			holder = 0
			if hs, err := m.LockHolders(ctx, conn); err == nil {
				holder = hs[lane].PID
			}
		}
		send(st[idx])
		return nil
	}
	ncfg := tu.notifierConfig()
	ncfg.Channel, ncfg.Logger = m.Channel(), c.log.With().Str("component", "notifier").Logger()
	// The first connection is retried while no usable database answers (a failover), for
	// --timeout, or defaultRetryTimeout without one (then exit 4); after that the listener
	// reconnects by itself.
	budget := timeout
	if budget == 0 {
		budget = defaultRetryTimeout
	}
	var l *notifier.Listener
	err = c.retry(ctx, budget, func(ctx context.Context) error {
		var err error
		if l, err = notifier.New(engine.SessionConnConfig(m), ncfg, handler); err != nil {
			return err
		}
		if err := l.Start(ctx); err != nil {
			return fmt.Errorf("listen on %s: %w", target(engine.SessionConnConfig(m)), err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	defer l.Stop()
	start := c.env.now()
	var last migrator.LaneStatus
	logged := false
	for {
		select {
		case st := <-updates:
			last = st
			if st.Version >= want {
				c.log.Info().Str("lane", lane).Int32("version", st.Version).Int32("wanted", want).
					Float64("waited_s", c.env.now().Sub(start).Seconds()).Msg("lane reached the version")
				return nil
			}
			if f := lanestate.BlockingFailure(info, st, want); f != nil {
				return fmt.Errorf("lane %q cannot reach version %d: recorded permanent failure of %s (fix the migration and deploy again): %s",
					lane, want, f.File, oneLine(st.Error))
			}
			if !logged {
				c.log.Info().Str("lane", lane).Int32("version", st.Version).Int32("wanted", want).Str("state", string(st.State)).
					Str("channel", m.Channel()).Msg("waiting for the lane through LISTEN/NOTIFY")
				logged = true
			}
		case <-wctx.Done():
			if ctx.Err() != nil {
				return fmt.Errorf("wait for lane %q: %w", lane, ctx.Err())
			}
			return timedOut(fmt.Sprintf("is at version %d", last.Version))
		}
	}
}
