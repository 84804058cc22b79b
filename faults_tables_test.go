package main

// Fault tests of issue 7, points 2 and 3: a lane's version table is one table whoever looks
// (search_path set by the connection string, a role owning a schema of its own name), and a
// missing version table is not version 0 when the history says otherwise.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/url"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// withSetting returns the connection string dbURL with one more setting: a query parameter of
// a postgres:// URL, or a keyword=value pair of a keyword/value string. The key "user" sets the
// user of a URL.
func withSetting(t *testing.T, dbURL, key, value string) string {
	t.Helper()
	if !strings.HasPrefix(dbURL, "postgres://") && !strings.HasPrefix(dbURL, "postgresql://") {
		return dbURL + " " + key + "='" + strings.ReplaceAll(value, "'", `\'`) + "'"
	}
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	if key == "user" {
		// A user in the query string (postgres:///db?host=/socket&user=x) wins over the userinfo.
		q := u.Query()
		q.Del("user")
		u.RawQuery = q.Encode()
		u.User = url.User(value)
		return u.String()
	}
	if u.RawQuery != "" {
		u.RawQuery += "&"
	}
	u.RawQuery += url.QueryEscape(key) + "=" + strings.ReplaceAll(url.QueryEscape(value), "+", "%20") // pgx reads "+" as itself
	return u.String()
}

// tempRole creates a login role with the given attributes ("superuser", or "nosuperuser
// nocreatedb nocreaterole"), and drops it at the end of the test. Call it before pgtest.NewDB,
// so that the database (which the role may own, or hold a schema of its name) is dropped first.
func tempRole(t *testing.T, attributes string) string {
	t.Helper()
	var b [6]byte
	_, _ = rand.Read(b[:])
	role := "lanes_r_" + hex.EncodeToString(b[:])
	admin := pgtest.Connect(t, pgtest.AdminURL(t))
	if _, err := admin.Exec(t.Context(), "create role "+role+" login "+attributes); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := admin.Exec(context.Background(), "drop role if exists "+role); err != nil {
			t.Errorf("drop role %s: %v", role, err)
		}
	})
	return role
}

// A replica whose session resolves unqualified names through another first schema (a role with
// a schema of its own name, or options=-c search_path=...) reads, locks, creates and writes the
// version table that exists, applies only the new migration, and names the qualified table in
// status. Before, it created a second version table in its first schema and applied every
// migration again. Then the version table is dropped: migrate refuses, naming both tables,
// instead of applying the lane again from version 1.
func TestFaultVersionTableIsOneTableWhoeverLooks(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		other func(t *testing.T, conn *pgx.Conn, dbURL, role string) string // the second replica's connection string
	}{
		{"search_path option", func(t *testing.T, conn *pgx.Conn, dbURL, _ string) string {
			if _, err := conn.Exec(t.Context(), "create schema other"); err != nil {
				t.Fatal(err)
			}
			return withSetting(t, dbURL, "options", "-c search_path=other,public")
		}},
		{"role with its own schema", func(t *testing.T, conn *pgx.Conn, dbURL, role string) string {
			if _, err := conn.Exec(t.Context(), "create schema "+role+" authorization "+role); err != nil {
				t.Fatal(err)
			}
			return withSetting(t, dbURL, "user", role)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			serverSlots.reserve(t, 1)
			role := tempRole(t, "superuser")
			dbURL := pgtest.NewDB(t)
			conn := pgtest.Connect(t, dbURL)
			if _, err := conn.Exec(t.Context(), "create table public.runs (file text)"); err != nil {
				t.Fatal(err)
			}
			dir := testkit.WriteTree(t, map[string]string{"fast/001_one.sql": "insert into public.runs values ('001');"})
			if res := runLanes(t, []string{"DATABASE_URL=" + dbURL, "LANES_MIGRATIONS=" + dir}, "migrate"); res.code != 0 {
				t.Fatalf("first migrate: %v", res)
			}
			writeFile(t, dir, "fast/002_two.sql", "insert into public.runs values ('002');")
			other := tc.other(t, conn, dbURL, role)
			// The other session's first schema really is another one.
			oc := pgtest.Connect(t, other)
			if s := pgtest.Scalar[string](t, oc, "select current_schema()"); s == "public" {
				t.Fatalf("current_schema() = %s for the second replica: the test does not test anything", s)
			}
			env := []string{"DATABASE_URL=" + other, "LANES_MIGRATIONS=" + dir}
			if res := runLanes(t, env, "migrate"); res.code != 0 {
				t.Fatalf("second migrate: %v", res)
			}
			for _, f := range []string{"001", "002"} {
				if n := pgtest.Scalar[int](t, conn, "select count(*) from public.runs where file = $1", f); n != 1 {
					t.Errorf("migration %s ran %d times, want exactly once", f, n)
				}
			}
			if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_class where relname = 'lanes_fast_version'"); n != 1 {
				t.Errorf("%d tables named lanes_fast_version, want 1", n)
			}
			if v := pgtest.Scalar[int](t, conn, "select version from public.lanes_fast_version"); v != 2 {
				t.Errorf("public.lanes_fast_version at %d, want 2", v)
			}
			res := runLanes(t, env, "status", "--json")
			var sj struct{ Lanes []migrator.LaneStatus }
			if res.code != 0 || json.Unmarshal([]byte(res.stdout), &sj) != nil || len(sj.Lanes) != 1 ||
				sj.Lanes[0].VersionTable != "public.lanes_fast_version" || sj.Lanes[0].Version != 2 {
				t.Errorf("status --json: want lane fast at version 2 in public.lanes_fast_version: %v", res)
			}

			// Point 3: the version table is dropped; the history still records both migrations.
			if _, err := conn.Exec(t.Context(), "drop table public.lanes_fast_version"); err != nil {
				t.Fatal(err)
			}
			res = runLanes(t, env, "migrate")
			if res.code != 1 || !strings.Contains(res.stderr, "lanes_fast_version") || !strings.Contains(res.stderr, "lanes_history") {
				t.Errorf("migrate without its version table: want exit 1 naming lanes_fast_version and lanes_history: %v", res)
			}
			if n := pgtest.Scalar[int](t, conn, "select count(*) from public.runs where file = '001'"); n != 1 {
				t.Errorf("migration 001 ran %d times after the version table was dropped", n)
			}
			if n := pgtest.Scalar[int](t, conn, "select count(*) from pg_class where relname = 'lanes_fast_version'"); n != 0 {
				t.Errorf("a version table was created although migrate refused")
			}
		})
	}
}
