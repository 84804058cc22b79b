package cli

import (
	"context"
	"flag"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/multilanes/lanes/migrator"
)

// controlFlags defines pause, resume and retry: one required --lane.
func controlFlags(action string) func(fs *flag.FlagSet) commandBody {
	return func(fs *flag.FlagSet) commandBody {
		lane := fs.String("lane", "", "the background `lane` to "+action+" (required)")
		return func(ctx context.Context, c *command, args []string) error {
			switch {
			case len(args) > 0:
				return usageErrorf("unexpected arguments %q", args)
			case *lane == "":
				return usageErrorf("--lane is required")
			}
			return runControl(ctx, c, action, *lane)
		}
	}
}

// runControl pauses, resumes or retries a lane: stored in the database and announced.
func runControl(ctx context.Context, c *command, action, lane string) error {
	m, err := c.migrator()
	if err != nil {
		return err
	}
	if m, err = c.forPooler(ctx, m); err != nil {
		return err
	}
	var names []string
	for _, l := range m.Lanes() {
		names = append(names, l.Name)
	}
	if !slices.Contains(names, lane) {
		return usageErrorf("unknown lane %q (lanes: %s)", lane, strings.Join(names, ", "))
	}
	conn, err := connect(ctx, m)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	switch action {
	case "pause":
		if err := m.Pause(ctx, conn, lane); err != nil {
			return err
		}
		c.log.Info().Str("lane", lane).Msg("lane paused: its applier stops at the next batch boundary (a migration that is not batched finishes first); nothing of it runs until lanes resume")
	case "resume":
		if err := m.Resume(ctx, conn, lane); err != nil {
			return err
		}
		c.log.Info().Str("lane", lane).Msg("lane resumed: a replica takes it up again, continuing after its last committed batch")
	case "retry":
		cleared, err := m.Retry(ctx, conn, lane)
		if err != nil {
			return err
		}
		if !cleared {
			c.log.Info().Str("lane", lane).Msg("the lane has no recorded failure: nothing to retry")
			return nil
		}
		c.log.Info().Str("lane", lane).Msg("failure cleared: replicas try the failed migration again")
	}
	return nil
}

// batchConfig reads the LANES_BATCH_* and LANES_MAX_REPLICATION_LAG variables; unset keeps the
// defaults of migrator.BatchConfig.
func (c *command) batchConfig() (migrator.BatchConfig, error) {
	var bc migrator.BatchConfig
	for _, v := range []struct {
		name string
		dst  *time.Duration
	}{
		{"LANES_BATCH_TARGET", &bc.Target},
		{"LANES_BATCH_PAUSE", &bc.Pause},
		{"LANES_MAX_REPLICATION_LAG", &bc.MaxReplicationLag},
		{"LANES_BATCH_STATEMENT_TIMEOUT", &bc.StatementTimeout},
		{"LANES_BATCH_LOCK_TIMEOUT", &bc.LockTimeout},
	} {
		s := strings.TrimSpace(c.env.getenv(v.name))
		if s == "" {
			continue
		}
		if v.name == "LANES_MAX_REPLICATION_LAG" && (s == "off" || s == "-1") {
			*v.dst = -1
			continue
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			return bc, usageErrorf("invalid %s=%q: want a duration such as 200ms or 2s", v.name, s)
		}
		*v.dst = d
	}
	if s := strings.TrimSpace(c.env.getenv("LANES_BATCH_NICE_RATIO")); s != "" {
		r, err := strconv.ParseFloat(s, 64)
		if err != nil || r < 0 {
			return bc, usageErrorf("invalid LANES_BATCH_NICE_RATIO=%q: want a number such as 0.5", s)
		}
		bc.NiceRatio = r
	}
	return bc, nil
}

// progressCell is the PROGRESS column of the status table: percent and ETA, or what is known.
func progressCell(p *migrator.Progress) string {
	if p == nil {
		return "-"
	}
	var b strings.Builder
	if p.Percent != nil {
		fmt.Fprintf(&b, "%.1f%%", *p.Percent)
	} else {
		fmt.Fprintf(&b, "%d done", p.Done)
	}
	if p.ETASeconds != nil {
		fmt.Fprintf(&b, " eta %s", (time.Duration(*p.ETASeconds) * time.Second).String())
	}
	if p.Phase != "" {
		fmt.Fprintf(&b, " %s", p.Phase)
	}
	if p.Throttled != "" {
		fmt.Fprintf(&b, " (throttled: %s)", p.Throttled)
	}
	return b.String()
}
