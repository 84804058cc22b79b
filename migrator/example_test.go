package migrator_test

import (
	"context"
	"fmt"
	"testing/fstest"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/migrator"
)

// Two lanes, each with its own version table and lock; a Go migration registered on the slow
// lane takes version 2 between two files.
func ExampleMigrator_Migrate() {
	ctx := context.Background()
	cc, err := pgx.ParseConfig(pgtest.ExampleDB())
	if err != nil {
		panic(err)
	}
	fast := migrator.Lane{Name: "fast", Mode: migrator.Blocking, FS: fstest.MapFS{
		"001_create.sql": {Data: []byte("create table items (id int primary key, name text);\n---- create above / drop below ----\ndrop table items;")},
	}}
	slow := migrator.Lane{Name: "slow", Mode: migrator.Background,
		FS: fstest.MapFS{
			"001_seed.sql":  {Data: []byte("insert into items values (1, 'one');")},
			"003_index.sql": {Data: []byte("---- tern: disable-tx ----\ndrop index concurrently if exists items_name;\ncreate index concurrently items_name on items (name);")},
		},
		Funcs: []migrator.GoMigration{{Version: 2, Name: "backfill", Up: func(ctx context.Context, tx pgx.Tx) error {
			_, err := tx.Exec(ctx, "insert into items select g, 'item ' || g from generate_series(2, 100) g")
			return err
		}}},
	}
	m, err := migrator.New(cc, []migrator.Lane{fast, slow}, migrator.Config{})
	if err != nil {
		panic(err) // a *migrator.LoadError names the lane and file
	}
	for _, lane := range m.Lanes() {
		res, err := m.Migrate(ctx, lane.Name)
		if err != nil {
			panic(err) // a *migrator.MigrationError names lane, file, statement and line
		}
		fmt.Printf("%s: %d -> %d (%d applied)\n", res.Lane, res.From, res.To, res.Applied)
	}
	// Output:
	// fast: 0 -> 1 (1 applied)
	// slow: 0 -> 3 (3 applied)
}
