package cli

import (
	"context"
	"fmt"
	"slices"
	"strings"
)

// runPlan prints what migrate would do: per lane in lane order, the version read lock-free and
// the pending migrations with their rendered SQL. It takes no lock and writes nothing; a
// missing version table reads as version 0.
func runPlan(ctx context.Context, c *command, only []string) error {
	m, err := c.migrator()
	if err != nil {
		return err
	}
	for _, n := range only {
		if err := checkLane(m, n); err != nil {
			return err
		}
	}
	conn, err := connect(ctx, m)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	lanes, err := m.Status(ctx, conn)
	if err != nil {
		return err
	}
	if err := m.AddDrift(ctx, conn, lanes); err != nil {
		return err
	}
	w := c.env.stdout
	fmt.Fprintf(w, "-- plan for %s (dry run: no lock taken, nothing written)\n", target(m.ConnConfig()))
	pending := 0
	for _, st := range lanes {
		if len(only) > 0 && !slices.Contains(only, st.Name) {
			continue
		}
		info, _ := m.Lane(st.Name)
		fmt.Fprintf(w, "\n-- lane %s (%s, version table %s): version %d, latest %d, state %s\n", st.Name, st.Mode, st.VersionTable, st.Version, st.Latest, st.State)
		if len(st.Drift) > 0 {
			fmt.Fprintf(w, "-- changed since applied: %s (migrate refuses without --allow-drift)\n", strings.Join(st.Drift, ", "))
		}
		if st.Locked {
			fmt.Fprintln(w, "-- another session holds the lane's lock now: migrate would wait for it")
		}
		if st.Version >= st.Latest {
			fmt.Fprintln(w, "-- nothing pending")
			continue
		}
		for _, mig := range info.Migrations[st.Version:] {
			pending++
			kind := "one transaction"
			switch {
			case mig.Batched():
				kind = "batched: one transaction per batch"
			case mig.DisableTx:
				kind = "disable-tx: statement by statement, outside a transaction"
			}
			fmt.Fprintf(w, "\n-- %s: version %d, %s, checksum %s\n", mig.Name, mig.Version, kind, mig.Checksum)
			if mig.SQL == "" {
				fmt.Fprintln(w, "-- (a Go migration: no SQL to show)")
				continue
			}
			fmt.Fprintln(w, strings.TrimRight(mig.SQL, "\n"))
		}
	}
	fmt.Fprintf(w, "\n-- %d migrations pending\n", pending)
	return nil
}
