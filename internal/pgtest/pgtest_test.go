package pgtest_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.RunMain(m) }

// databaseExists reports whether the server at admin has a database named name.
func databaseExists(t *testing.T, admin, name string) bool {
	t.Helper()
	var exists bool
	err := pgtest.Connect(t, admin).QueryRow(t.Context(), "select exists (select from pg_database where datname = $1)", name).Scan(&exists)
	if err != nil {
		t.Fatal(err)
	}
	return exists
}

func TestNewDB(t *testing.T) {
	t.Logf("backend %q", pgtest.Backend())
	admin := pgtest.AdminURL(t)
	var names [2]string
	t.Run("group", func(t *testing.T) {
		for i := range names {
			t.Run("db", func(t *testing.T) {
				t.Parallel()
				// Registered before NewDB, so this connection is still open when the
				// database is dropped: with (force) must end it.
				var conn *pgx.Conn
				t.Cleanup(func() { _ = conn.Close(context.Background()) })
				url := pgtest.NewDB(t)
				conn, err := pgx.Connect(t.Context(), url)
				if err != nil {
					t.Fatal(err)
				}
				var tables int
				err = conn.QueryRow(t.Context(),
					"select current_database(), (select count(*) from pg_tables where schemaname = 'public')").Scan(&names[i], &tables)
				if err != nil {
					t.Fatal(err)
				}
				if tables != 0 {
					t.Errorf("new database %s has %d tables", names[i], tables)
				}
				if _, err := conn.Exec(t.Context(), "create table lane (id int primary key); insert into lane values (1)"); err != nil {
					t.Fatal(err)
				}
			})
		}
	})
	if names[0] == "" || names[0] == names[1] {
		t.Fatalf("databases %q, want two distinct names", names)
	}
	for _, name := range names {
		if databaseExists(t, admin, name) {
			t.Errorf("database %s still exists after its test ended", name)
		}
	}
}

func TestBackendIsKnown(t *testing.T) {
	pgtest.AdminURL(t) // skips when there is no server
	switch b := pgtest.Backend(); b {
	case "url", "container", "cluster":
	default:
		t.Fatalf("Backend() = %q", b)
	}
}
