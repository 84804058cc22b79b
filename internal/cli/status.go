package cli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/multilanes/lanes/internal/pgconnect"
	"github.com/multilanes/lanes/migrator"
)

func statusFlags(fs *flag.FlagSet) commandBody {
	asJSON := fs.Bool("json", false, "print JSON ({\"lanes\":[...]}) instead of a table")
	watch := fs.Bool("watch", false, "redraw the table live from the notifications until interrupted")
	allowDrift := fs.Bool("allow-drift", false, "report a lane whose applied files were renamed or changed since as done (or\nwhat it is), not drift; the drift is still listed")
	timeout := retryTimeoutFlag(fs, "status")
	return func(ctx context.Context, c *command, args []string) error {
		if len(args) > 0 {
			return usageErrorf("unexpected arguments %q", args)
		}
		c.allowDrift = *allowDrift
		if *timeout < 0 {
			return usageErrorf("--timeout must not be negative")
		}
		if *watch {
			if *asJSON {
				return usageErrorf("--watch draws a table: it does not take --json")
			}
			m, err := c.migrator()
			if err != nil {
				return err
			}
			if m, err = c.forPooler(ctx, m); err != nil {
				return err
			}
			return runWatch(ctx, c, m)
		}
		return runStatus(ctx, c, *asJSON, *timeout)
	}
}

// statusJSON is what status --json prints.
type statusJSON struct {
	Lanes []migrator.LaneStatus `json:"lanes"`
	// Server says whether the server takes writes ({"read_only": true, "in_recovery": true} on
	// a hot standby, where no lane can be applied).
	Server pgconnect.Server `json:"server"`
}

func runStatus(ctx context.Context, c *command, asJSON bool, timeout time.Duration) error {
	m, err := c.migrator()
	if err != nil {
		return err
	}
	if m, err = c.forPooler(ctx, m); err != nil {
		return err
	}
	var lanes []migrator.LaneStatus
	var server pgconnect.Server
	err = c.retry(ctx, timeout, func(ctx context.Context) error {
		conn, err := connect(ctx, m)
		if err != nil {
			return err
		}
		defer conn.Close(context.WithoutCancel(ctx))
		if lanes, err = m.Status(ctx, conn); err != nil {
			return err
		}
		if err := m.AddDrift(ctx, conn, lanes); err != nil {
			return err
		}
		server, err = pgconnect.ReadServer(ctx, conn)
		return err
	})
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(c.env.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(statusJSON{Lanes: lanes, Server: server}); err != nil {
			return fmt.Errorf("write status: %w", err)
		}
		return nil
	}
	if err := writeStatusTable(c.env.stdout, lanes); err != nil {
		return err
	}
	if server.ReadOnly {
		// After the table, so that scripts reading its first line still find the header.
		fmt.Fprintf(c.env.stdout, "server: %s: no lane can be applied here until it takes writes (a promotion)\n", server)
	}
	return nil
}

// writeStatusTable writes the lanes as the status table.
func writeStatusTable(w io.Writer, lanes []migrator.LaneStatus) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LANE\tMODE\tVERSION\tLATEST\tSTATE\tLOCKED\tPROGRESS\tVERSION TABLE\tERROR")
	for _, l := range lanes {
		locked := "no"
		if l.Locked {
			locked = "yes"
		}
		problem := oneLine(l.Error)
		if len(l.Drift) > 0 {
			problem = strings.TrimSpace("changed since applied: " + strings.Join(l.Drift, ", ") + "; " + problem)
		}
		if l.NextAttempt != nil {
			// The fleet's retry schedule after transient failures (lock timeout, deadlock...).
			problem = strings.TrimSuffix(fmt.Sprintf("%d transient failure(s) in a row; next attempt at %s; %s",
				l.Attempts, l.NextAttempt.UTC().Format(time.RFC3339), problem), "; ")
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", l.Name, l.Mode, l.Version, l.Latest, l.State, locked, progressCell(l.Progress), l.VersionTable, problem)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
