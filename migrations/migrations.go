// Package migrations holds the demo lanes that `lanes` embeds: the fast lane creates and
// populates an example table; the slow lane backfills it in batches (a Go Backfill), then
// builds an index concurrently.
package migrations

import (
	"context"
	"embed"
	"io/fs"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/migrator"
)

//go:embed fast/*.sql slow/*.sql
var files embed.FS

// FS returns the demo migrations: one folder per lane.
func FS() fs.FS { return files }

// Lanes returns the demo lanes. The slow lane's first migration is a batched backfill over the
// example table (a Go Backfill: one transaction per key range, resumable, its progress
// announced to every replica); BatchConfig returns the settings that spread it over about
// loadDuration (5s in the demo).
func Lanes() []migrator.Lane {
	fast, _ := fs.Sub(files, "fast") // cannot fail: the folder is embedded
	slow, _ := fs.Sub(files, "slow")
	return []migrator.Lane{
		{Name: "fast", Mode: migrator.Blocking, FS: fast},
		{Name: "slow", Mode: migrator.Background, FS: slow, Funcs: []migrator.GoMigration{
			{Version: 1, Name: "backfill_example", Backfill: &migrator.Backfill{Table: "example", Key: "id", Size: 1000, Range: BackfillExample}},
		}},
	}
}

// BackfillExample marks the rows of example in (lo, hi] loaded: the demo's backfill.
func BackfillExample(ctx context.Context, tx pgx.Tx, lo, hi int64) error {
	_, err := tx.Exec(ctx, "update example set loaded = true, name = 'loaded-' || id where id > $1 and id <= $2", lo, hi)
	return err
}

// BatchConfig returns batch settings that spread the demo's backfill of 50,000 rows over about
// d: batches of about a thousand rows with a pause between them.
func BatchConfig(d time.Duration) migrator.BatchConfig {
	return migrator.BatchConfig{Target: 50 * time.Millisecond, Pause: d / 50}
}
