package main

import (
	"encoding/json"
	"net/url"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
)

// The privileges docs/deploy.md gives, tried: a role that owns its database, and nothing more,
// applies every kind of migration (a table, a concurrent index, a batched backfill); a role
// with SELECT on the lanes' tables only reads the status and waits for a lane.
func TestPrivilegesOwnerAppliesReaderReads(t *testing.T) {
	t.Parallel()
	owner, reader := tempRole(t, "nosuperuser nocreatedb nocreaterole"), tempRole(t, "nosuperuser nocreatedb nocreaterole")
	dbURL := pgtest.NewDB(t)
	admin := pgtest.Connect(t, dbURL)
	db := pgtest.Scalar[string](t, admin, "select current_database()")
	for _, q := range []string{
		"alter database " + pgx.Identifier{db}.Sanitize() + " owner to " + owner,
		"alter schema public owner to " + owner, // PostgreSQL 13 and 14: public is the superuser's
	} {
		if _, err := admin.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	dir := testkit.WriteTree(t, map[string]string{
		"fast/001_items.sql": `create table items (id int8 primary key, n int not null default 0);
insert into items (id) select g from generate_series(1, 3000) g;`,
		"slow/001_index.sql": `---- tern: disable-tx ----
drop index concurrently if exists items_n_idx;
create index concurrently items_n_idx on items (n);`,
		"slow/002_visit.sql": `---- lanes: batch table=items key=id size=500 ----
update items set n = n + 1 where id > $1 and id <= $2;`,
	})
	as := func(role string) []string {
		return []string{"DATABASE_URL=" + withSetting(t, dbURL, "user", role), "LANES_MIGRATIONS=" + dir}
	}
	if run := runLanes(t, as(owner), "migrate"); run.code != 0 {
		t.Fatalf("migrate as the database's owner (no superuser): %s", run)
	}
	oconn := pgtest.Connect(t, withSetting(t, dbURL, "user", owner))
	if n := pgtest.Scalar[int](t, oconn, "select count(*) from items where n <> 1"); n != 0 {
		t.Fatalf("%d rows not visited once by the backfill", n)
	}
	if _, err := oconn.Exec(t.Context(), "grant select on all tables in schema public to "+reader); err != nil {
		t.Fatal(err)
	}

	run := runLanes(t, as(reader), "status", "--json")
	if run.code != 0 {
		t.Fatalf("status as a role with SELECT only: %s", run)
	}
	var st struct {
		Lanes []struct{ Name, State string }
	}
	if err := json.Unmarshal([]byte(run.stdout), &st); err != nil || len(st.Lanes) != 2 {
		t.Fatalf("status --json: %v\n%s", err, run)
	}
	for _, l := range st.Lanes {
		if l.State != "done" {
			t.Errorf("status as the reader: lane %s is %s, want done", l.Name, l.State)
		}
	}
	if run := runLanes(t, as(reader), "wait", "--lane", "slow", "--timeout", "1m"); run.code != 0 {
		t.Fatalf("wait as a role with SELECT only: %s", run)
	}
	// The reader cannot apply anything, and says why without a password in sight.
	if run := runLanes(t, as(reader), "force", "--lane", "slow", "--version", "1"); run.code == 0 || !strings.Contains(run.stderr, "permission denied") {
		t.Fatalf("force as the reader: %s", run)
	}
	if u, err := url.Parse(dbURL); err == nil {
		if p, ok := u.User.Password(); ok && p != "" && strings.Contains(run.stderr, p) {
			t.Fatal("a password in the output")
		}
	}
}
