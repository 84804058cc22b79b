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
	Files []string // applied files whose rendered SQL no longer matches the recorded checksum
}

func (e *DriftError) Error() string {
	return fmt.Sprintf("lane %q: applied migrations changed since they were applied: %s (restore them, or allow drift to continue)",
		e.Lane, strings.Join(e.Files, ", "))
}

// drift returns the applied migrations of the lane, up to version, whose recorded checksum
// differs from this binary's. Migrations applied before the history table existed, or by
// another tool, have no record and are not reported.
func (m *Migrator) drift(ctx context.Context, q Querier, l *loadedLane, upTo int32) ([]string, error) {
	n := min(int(upTo), len(l.migrations))
	if n == 0 {
		return nil, nil
	}
	versions := make([]int32, n)
	sums := make([]string, n)
	for i, mig := range l.migrations[:n] {
		versions[i], sums[i] = mig.Version, mig.Checksum
	}
	rows, err := q.Query(ctx, `select h.name from (
  select distinct on (version) version, name, checksum from `+m.history.Quoted()+`
  where lane = $1 and error is null order by version, id desc) h
join unnest($2::int4[], $3::text[]) as b(version, checksum) using (version)
where h.checksum <> b.checksum order by h.version`, l.Name, versions, sums)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // no history table yet
			return nil, nil
		}
		return nil, fmt.Errorf("lane %q: read history: %w", l.Name, err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
			return nil, nil
		}
		return nil, fmt.Errorf("lane %q: read history: %w", l.Name, err)
	}
	return names, nil
}

// AddDrift fills the Drift field of each status with the applied files of that lane that
// changed since they were applied (one query per lane). Status leaves it out because the
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
	}
	return nil
}
