package cli

import (
	"context"
	"flag"
	"slices"
	"strings"
	"time"

	"github.com/multilanes/lanes/migrator"
)

func migrateFlags(fs *flag.FlagSet) commandBody {
	var lanes lanesFlag
	fs.Var(&lanes, "lane", "apply only this `lane` (repeatable); the lanes still run in lane order")
	allowDrift := fs.Bool("allow-drift", false, "apply pending migrations although applied files changed since they were\napplied (by default migrate refuses and names the files)")
	dryRun := fs.Bool("dry-run", false, "print the plan (lanes, pending files in order, rendered SQL) and exit: takes\nno lock and writes nothing")
	timeout := retryTimeoutFlag(fs, "migrate")
	return func(ctx context.Context, c *command, args []string) error {
		if len(args) > 0 {
			return usageErrorf("unexpected arguments %q", args)
		}
		if *timeout < 0 {
			return usageErrorf("--timeout must not be negative")
		}
		c.allowDrift = *allowDrift
		if *dryRun {
			return runPlan(ctx, c, lanes)
		}
		return runMigrate(ctx, c, lanes, *timeout)
	}
}

// runMigrate applies the pending migrations of the named lanes (all when none) in lane order.
// Each lane is retried while no usable database answers (see command.retry), for at most
// timeout per outage: a migration cut by a failover runs again, from the start, on the new
// primary.
func runMigrate(ctx context.Context, c *command, only []string, timeout time.Duration) error {
	m, err := c.migrator()
	if err != nil {
		return err
	}
	var names []string
	for _, l := range m.Lanes() {
		names = append(names, l.Name)
	}
	for _, n := range only {
		if !slices.Contains(names, n) {
			return usageErrorf("unknown lane %q (lanes: %s)", n, strings.Join(names, ", "))
		}
	}
	if m, err = c.forPooler(ctx, m); err != nil {
		return err
	}
	c.log.Info().Str("target", target(m.ConnConfig())).Msg("applying db migrations")
	for _, name := range names {
		if len(only) > 0 && !slices.Contains(only, name) {
			continue
		}
		var res migrator.Result
		err := c.retry(ctx, timeout, func(ctx context.Context) error {
			var err error
			res, err = m.Migrate(ctx, name)
			return err
		})
		if err != nil {
			return err
		}
		ev := c.log.Info().Str("lane", name).Int32("from", res.From).Int32("version", res.To).Int32("latest", res.Latest).Int("applied", res.Applied)
		if res.Applied == 0 {
			ev.Msg("lane already up to date")
		} else {
			ev.Msg("lane migrated")
		}
	}
	return nil
}
