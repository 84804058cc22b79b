// Package migrations holds the demo lanes that `lanes` embeds: the fast lane creates and
// populates an example table; the slow lane loads data for a while in a Go migration, then
// builds an index concurrently.
package migrations

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/migrator"
)

//go:embed fast/*.sql slow/*.sql
var files embed.FS

// FS returns the demo migrations: one folder per lane.
func FS() fs.FS { return files }

// Lanes returns the demo lanes. The slow lane's first migration is a Go function that loads
// rows in batches for about loadDuration (5s in the demo); zero makes it load at once.
func Lanes(loadDuration time.Duration) []migrator.Lane {
	fast, _ := fs.Sub(files, "fast") // cannot fail: the folder is embedded
	slow, _ := fs.Sub(files, "slow")
	return []migrator.Lane{
		{Name: "fast", Mode: migrator.Blocking, FS: fast},
		{Name: "slow", Mode: migrator.Background, FS: slow, Funcs: []migrator.GoMigration{
			{Version: 1, Name: "load_example", Up: LoadExample(loadDuration)},
		}},
	}
}

// LoadExample returns the Go migration that loads 50 batches of 1,000 rows into example,
// spread over d, honouring ctx between batches.
func LoadExample(d time.Duration) migrator.TxFunc {
	const batches = 50
	return func(ctx context.Context, tx pgx.Tx) error {
		pause := d / batches
		for b := 0; b < batches; b++ {
			if _, err := tx.Exec(ctx, `insert into example (name, loaded)
select 'loaded-' || ($1::int * 1000 + g), true from generate_series(1, 1000) g`, b); err != nil {
				return fmt.Errorf("load batch %d: %w", b, err)
			}
			if pause > 0 {
				t := time.NewTimer(pause)
				select {
				case <-ctx.Done():
					t.Stop()
					return ctx.Err()
				case <-t.C:
				}
			}
		}
		return nil
	}
}
