package migrator_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

// A failure is announced with lane, version, state and file only: any role may LISTEN, and the
// error of a failing `alter role ... password '...'` quotes the password. The history table and
// Status keep the error; Redacted masks its string literals.
func TestFailureIsAnnouncedWithoutItsText(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	const secret = "S3cret-Passw0rd"
	if _, err := conn.Exec(ctx, "listen lanes_done"); err != nil {
		t.Fatal(err)
	}
	lane := migrator.Lane{Name: "fast", FS: fstest.MapFS{
		"001_role.sql": testkit.File("select 1;\nalter role lanes_no_such_role_x password '" + secret + "';"),
	}}
	m := newMigrator(t, cc, lane)
	if _, err := m.Migrate(ctx, "fast"); err == nil || !strings.Contains(err.Error(), "lanes_no_such_role_x") {
		t.Fatalf("err = %v", err)
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	n, err := conn.WaitForNotification(wctx)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(n.Payload, secret) || strings.Contains(n.Payload, "alter role") {
		t.Fatalf("the failure's payload carries its statement: %s", n.Payload)
	}
	if want := `{"lane":"fast","version":1,"state":"failed","file":"001_role.sql"}`; n.Payload != want {
		t.Fatalf("payload = %s, want %s", n.Payload, want)
	}
	// Earlier releases' payloads are still understood.
	for payload, state := range map[string]string{
		`{"lane":"fast","version":2,"done":true}`:     wire.Done,
		`{"lane":"fast","version":2,"error":"boom"}`:  wire.Failed,
		`{"lane":"fast","version":2,"released":true}`: wire.Released,
		`{"lane":"fast","version":2}`:                 wire.Applied,
	} {
		if ev, err := wire.Parse(payload); err != nil || ev.State != state || ev.Lane != "fast" || ev.Version != 2 {
			t.Errorf("ParseEvent(%s) = %+v, %v; want state %s", payload, ev, err, state)
		}
	}

	st, err := m.Status(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(st[0].Error, secret) || st[0].Failure == nil || !strings.Contains(st[0].Failure.Statement, secret) {
		t.Fatalf("Status, read with database credentials, keeps the error: %+v %+v", st[0], st[0].Failure)
	}
	r := st[0].Redacted()
	if strings.Contains(r.Error, secret) || strings.Contains(r.Failure.Statement, secret) ||
		!strings.Contains(r.Error, "lanes_no_such_role_x") || !strings.Contains(r.Failure.Statement, "alter role") {
		t.Fatalf("Redacted = %q / %q: want the literal masked, the rest kept", r.Error, r.Failure.Statement)
	}
	if !strings.Contains(st[0].Failure.Statement, secret) {
		t.Fatal("Redacted changed the status it was called on")
	}
}

func TestMaskLiterals(t *testing.T) {
	for in, want := range map[string]string{
		`alter role x password 'pw'`:                        `alter role x password '***'`,
		`select 'a''b', E'c\'d', $$e;f$$, $t$ g $t$ from t`: `select '***', E'***', $$***$$, $t$***$t$ from t`,
		`syntax error at or near "'secret'"`:                `syntax error at or near "'***'"`,
		`statement: insert into t values ('cut short…`:      `statement: insert into t values ('***`,
		`relation "t" does not exist; select 1`:             `relation "t" does not exist; select 1`,
		`a$b$ stays, $1 stays`:                              `a$b$ stays, $1 stays`,
		`password'glued'`:                                   `password'***'`,
		`$$unterminated`:                                    `$$***`,
		`no literal at all`:                                 `no literal at all`,
		`ERROR: role "r" does not exist (SQLSTATE 42704)`:   `ERROR: role "r" does not exist (SQLSTATE 42704)`,
		`value 'x' and value 'y'`:                           `value '***' and value '***'`,
		`E'\\'`:                                             `E'***'`,
		`it's prose`:                                        `it'***`,
		"multi\nline 'sec\nret' end":                        "multi\nline '***' end",
		`U&'d\0061t\+000061'`:                               `U&'***'`,
		`select $tag$ a $other$ b $tag$, 'z'`:               `select $tag$***$tag$, '***'`,
		`'`:                                                 `'***`,
		`''`:                                                `'***'`,
	} {
		if got := migrator.MaskLiterals(in); got != want {
			t.Errorf("MaskLiterals(%q) = %q, want %q", in, got, want)
		}
	}
}

// A failing multi-megabyte file stores a bounded excerpt of its statement around the error
// position, and a bounded error, with the file's checksum; a status read never fetches more than
// that, even from a huge row written by an earlier release.
func TestFailureRecordsAreBounded(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	big := strings.Repeat("x", 3<<20)
	lane := migrator.Lane{Name: "fast", FS: fstest.MapFS{
		"001_big.sql": testkit.File("create table t (i int);\nselect '" + big + "' as filler,\n  no_such_column_here from t;"),
	}}
	m := newMigrator(t, cc, lane)
	_, err := m.Migrate(ctx, "fast")
	if err == nil || !strings.Contains(err.Error(), "no_such_column_here") {
		t.Fatalf("err = %v", err)
	}
	var errLen, stmtLen int
	var stmt, sum string
	if err := conn.QueryRow(ctx, "select octet_length(error), octet_length(statement), statement, checksum from lanes_history where error is not null").
		Scan(&errLen, &stmtLen, &stmt, &sum); err != nil {
		t.Fatal(err)
	}
	info, _ := m.Lane("fast")
	if errLen > 4000 || stmtLen > 2000 || sum != info.Migrations[0].Checksum {
		t.Fatalf("history row: error %d bytes, statement %d bytes, checksum %s; want at most 4000 and 2000 bytes and the file's checksum %s",
			errLen, stmtLen, sum, info.Migrations[0].Checksum)
	}
	if !strings.Contains(stmt, "no_such_column_here") || !strings.HasPrefix(stmt, "…") {
		t.Fatalf("the excerpt is not around the error position: %q…", stmt[:min(len(stmt), 80)])
	}

	// A row as an earlier release wrote it: the whole statement and a huge error.
	if _, err := conn.Exec(ctx, `insert into lanes_history (lane, version, name, checksum, started_at, finished_at, host, pid, application_name, error, sqlstate, statement)
values ('fast', 1, '001_big.sql', 'old', now(), now(), 'h', 1, 'a', repeat('e', 5000000), '42703', repeat('s', 5000000))`); err != nil {
		t.Fatal(err)
	}
	st, err := m.Status(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	if st[0].Failure == nil || len(st[0].Error) > 4000 || len(st[0].Failure.Statement) > 2000 {
		t.Fatalf("status fetched %d bytes of error and %d of statement", len(st[0].Error), len(st[0].Failure.Statement))
	}
}

// Drift is checked by file name and checksum for every applied version, also on a lane that is
// up to date: Migrate refuses (naming the files and how to allow it), AddDrift reports the
// state drift, and AllowDrift lets both go on. A Go migration drifts when its Revision changes.
func TestDriftByNameOrChecksumOnAnUpToDateLane(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	noop := func(context.Context, pgx.Tx) error { return nil }
	lane := func(files fstest.MapFS, revision string) migrator.Lane {
		return migrator.Lane{Name: "slow", Mode: migrator.Background, FS: files,
			Funcs: []migrator.GoMigration{{Version: 3, Name: "go", Revision: revision, Up: noop}}}
	}
	orig := fstest.MapFS{"001_create.sql": testkit.File("create table a (i int);"), "002_insert.sql": testkit.File("insert into a values (1);")}
	if _, err := newMigrator(t, cc, lane(orig, "1")).Migrate(ctx, "slow"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		lane  migrator.Lane
		drift []string
	}{
		{"renamed", lane(fstest.MapFS{"001_create.sql": orig["001_create.sql"], "002_other_name.sql": orig["002_insert.sql"]}, "1"),
			[]string{"002_other_name.sql (applied as 002_insert.sql)"}},
		{"changed", lane(fstest.MapFS{"001_create.sql": testkit.File("create table a (i bigint);"), "002_insert.sql": orig["002_insert.sql"]}, "1"),
			[]string{"001_create.sql"}},
		{"go revision", lane(orig, "2"), []string{"003_go.go"}},
	} {
		m := newMigrator(t, cc, tc.lane)
		_, err := m.Migrate(ctx, "slow")
		var de *migrator.DriftError
		if !errors.As(err, &de) || !slices.Equal(de.Files, tc.drift) || !strings.Contains(err.Error(), "--allow-drift") {
			t.Errorf("%s: Migrate on an up-to-date lane = %v, want a *DriftError for %q naming --allow-drift", tc.name, err, tc.drift)
		}
		st, err := m.Status(ctx, conn)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.AddDrift(ctx, conn, st); err != nil {
			t.Fatal(err)
		}
		if st[0].State != migrator.StateDrift || !slices.Equal(st[0].Drift, tc.drift) {
			t.Errorf("%s: status = %s %q, want drift %q", tc.name, st[0].State, st[0].Drift, tc.drift)
		}
		allowed, err := migrator.New(cc, []migrator.Lane{tc.lane}, migrator.Config{AllowDrift: true})
		if err != nil {
			t.Fatal(err)
		}
		if res, err := allowed.Migrate(ctx, "slow"); err != nil || res.To != 3 {
			t.Errorf("%s: Migrate with AllowDrift = %+v, %v", tc.name, res, err)
		}
		st, _ = allowed.Status(ctx, conn)
		if err := allowed.AddDrift(ctx, conn, st); err != nil || st[0].State != migrator.StateDone || len(st[0].Drift) == 0 {
			t.Errorf("%s: status with AllowDrift = %s %q, %v; want done, drift still listed", tc.name, st[0].State, st[0].Drift, err)
		}
	}
}
