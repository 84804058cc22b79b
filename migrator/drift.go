package migrator

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// DriftError is returned by Migrate when files this binary has were changed after they were
// applied: the database does not hold what the files now say. Set Config.AllowDrift to apply
// pending migrations anyway.
type DriftError struct {
	Lane  string
	Files []string // applied migrations whose file name or checksum differs from the recorded one
}

func (e *DriftError) Error() string {
	return fmt.Sprintf("lane %q: applied migrations changed since they were applied: %s (restore them, or allow drift to continue: lanes migrate --allow-drift, Config.AllowDrift)",
		e.Lane, strings.Join(e.Files, ", "))
}

// drift returns the applied migrations of the lane, up to version, whose recorded file name or
// checksum differs from this binary's: the file's name, followed by "(applied as NAME)" when the
// name differs. Migrations applied before the history table existed, or by another tool, have no
// record and are not reported.
func (m *Migrator) drift(ctx context.Context, q Querier, l *loadedLane, upTo int32) ([]string, error) {
	n := min(int(upTo), len(l.migrations))
	if n == 0 {
		return nil, nil
	}
	versions := make([]int32, n)
	sums := make([]string, n)
	names := make([]string, n)
	for i, mig := range l.migrations[:n] {
		versions[i], sums[i], names[i] = mig.Version, mig.Checksum, mig.Name
	}
	rows, err := q.Query(ctx, `select case when h.name = b.name then b.name else b.name || ' (applied as ' || h.name || ')' end from (
  select distinct on (version) version, name, checksum from `+m.history.Quoted()+`
  where lane = $1 and error is null order by version, id desc) h
join unnest($2::int4[], $3::text[], $4::text[]) as b(version, checksum, name) using (version)
where h.checksum <> b.checksum or h.name <> b.name order by h.version`, l.Name, versions, sums, names)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // no history table yet
			return nil, nil
		}
		return nil, fmt.Errorf("lane %q: read history: %w", l.Name, err)
	}
	drifted, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
			return nil, nil
		}
		return nil, fmt.Errorf("lane %q: read history: %w", l.Name, err)
	}
	return drifted, nil
}

// AddDrift fills the Drift field of each status with the applied migrations of that lane whose
// file name or checksum differs from the recorded one (one query per lane), and sets the state
// of such a lane to StateDrift unless Config.AllowDrift is set. Status leaves it out because the
// listener of every replica calls Status on each notification.
func (m *Migrator) AddDrift(ctx context.Context, q Querier, statuses []LaneStatus) error {
	for i := range statuses {
		l, ok := m.byName[statuses[i].Name]
		if !ok {
			continue
		}
		files, err := m.drift(ctx, q, l, statuses[i].Version)
		if err != nil {
			return err
		}
		statuses[i].Drift = files
		if len(files) > 0 && !m.cfg.AllowDrift {
			statuses[i].State = StateDrift
		}
	}
	return nil
}
