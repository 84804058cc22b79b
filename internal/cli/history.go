package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/multilanes/lanes/migrator"
)

func historyFlags(fs *flag.FlagSet) commandBody {
	lane := fs.String("lane", "", "show only this `lane` (default: every lane)")
	limit := fs.Int("limit", 50, "show at most `N` rows, newest first")
	asJSON := fs.Bool("json", false, "print JSON ({\"history\":[...]}) instead of a table")
	return func(ctx context.Context, c *command, args []string) error {
		if len(args) > 0 {
			return usageErrorf("unexpected arguments %q", args)
		}
		if *limit <= 0 {
			return usageErrorf("--limit must be 1 or more")
		}
		return runHistory(ctx, c, *lane, *limit, *asJSON)
	}
}

// historyJSON is what history --json prints.
type historyJSON struct {
	History []migrator.HistoryEntry `json:"history"`
}

// checkLane returns a usage error unless lane is one of m's lanes.
func checkLane(m *migrator.Migrator, lane string) error {
	var names []string
	for _, l := range m.Lanes() {
		names = append(names, l.Name)
	}
	if !slices.Contains(names, lane) {
		return usageErrorf("unknown lane %q (lanes: %s)", lane, strings.Join(names, ", "))
	}
	return nil
}

// runHistory prints the newest rows of the history table: applied, failed and forced.
func runHistory(ctx context.Context, c *command, lane string, limit int, asJSON bool) error {
	m, err := c.migrator()
	if err != nil {
		return err
	}
	if m, err = c.forPooler(ctx, m); err != nil {
		return err
	}
	if lane != "" {
		if err := checkLane(m, lane); err != nil {
			return err
		}
	}
	conn, err := connect(ctx, m)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rows, err := m.History(ctx, conn, lane, limit)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(c.env.stdout)
		enc.SetIndent("", "  ")
		if rows == nil {
			rows = []migrator.HistoryEntry{}
		}
		if err := enc.Encode(historyJSON{History: rows}); err != nil {
			return fmt.Errorf("write history: %w", err)
		}
		return nil
	}
	tw := tabwriter.NewWriter(c.env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tLANE\tVERSION\tFILE\tRESULT\tSTARTED\tDURATION\tREPLICA\tCHECKSUM\tERROR")
	for _, h := range rows {
		result := h.Result
		if h.ForcedFrom != nil {
			result += " (from " + strconv.Itoa(int(*h.ForcedFrom)) + ")"
		}
		replica := fmt.Sprintf("%s/%d", h.Host, h.PID)
		if h.ApplicationName != "" {
			replica = h.ApplicationName
		}
		sum := h.Checksum
		if len(sum) > 12 {
			sum = sum[:12]
		}
		problem := oneLine(h.Error)
		if h.SQLState != "" {
			problem = strings.TrimSpace(problem + " [" + h.SQLState + "]")
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", h.ID, h.Lane, h.Version, dash(h.File), result,
			h.StartedAt.UTC().Format(time.RFC3339), time.Duration(h.DurationSeconds*float64(time.Second)).Round(time.Millisecond),
			replica, dash(sum), problem)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write history: %w", err)
	}
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func forceFlags(fs *flag.FlagSet) commandBody {
	lane := fs.String("lane", "", "the `lane` whose version to set (required)")
	version := fs.Int("version", -1, "the `version` to record (required): the last migration the database now holds")
	return func(ctx context.Context, c *command, args []string) error {
		switch {
		case len(args) > 0:
			return usageErrorf("unexpected arguments %q", args)
		case *lane == "":
			return usageErrorf("--lane is required")
		case *version < 0:
			return usageErrorf("--version is required (0 or more)")
		}
		return runForce(ctx, c, *lane, int32(*version))
	}
}

// runForce sets a lane's version after a manual repair, recorded in history as forced.
func runForce(ctx context.Context, c *command, lane string, version int32) error {
	m, err := c.migrator()
	if err != nil {
		return err
	}
	if err := checkLane(m, lane); err != nil {
		return err
	}
	if m, err = c.forPooler(ctx, m); err != nil {
		return err
	}
	from, err := m.Force(ctx, lane, version)
	if err != nil {
		var le *migrator.LockedError
		if errors.As(err, &le) {
			return fmt.Errorf("refused: %w", err)
		}
		return err
	}
	info, _ := m.Lane(lane)
	fmt.Fprintf(c.env.stdout, "lane %s: version %d -> %d (latest known to this binary: %d); recorded in history as forced\n", lane, from, version, info.Latest)
	return nil
}
