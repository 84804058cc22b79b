package migrator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/testkit"
)

func noop(context.Context, pgx.Tx) error { return nil }

func TestLoadLane(t *testing.T) {
	fsys := fstest.MapFS{
		"001_create.sql":     testkit.File("\n\ncreate table {{.table}} (i int);\n---- create above / drop below ----\ndrop table {{.table}};"),
		"003_index.sql":      testkit.File("---- tern: disable-tx ----\ncreate index concurrently i on t (i);"),
		"004_shared.sql":     testkit.File(`{{ template "shared/grant.sql" . }}`),
		"shared/grant.sql":   testkit.File("grant select on {{.table}} to public;"),
		"README.md":          testkit.File("not a migration"),
		"notes/ignored.txt":  testkit.File("x"),
		"shared/also_ok.sql": testkit.File("-- shared templates may be anything"),
	}
	l, err := loadLane(Lane{Name: "slow", Mode: Background, FS: fsys, Data: map[string]any{"table": "t"},
		Funcs: []GoMigration{{Version: 2, Name: "load", Up: noop}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := l.latest(); got != 4 {
		t.Fatalf("latest = %d, want 4", got)
	}
	names := []string{}
	for _, m := range l.migrations {
		names = append(names, m.Name)
	}
	if want := "001_create.sql 002_load.go 003_index.sql 004_shared.sql"; strings.Join(names, " ") != want {
		t.Fatalf("names = %q, want %q", names, want)
	}
	m1 := l.migrations[0]
	if m1.SQL != "create table t (i int);" || m1.DisableTx || m1.lineOffset != 2 {
		t.Fatalf("001 = %+v", m1)
	}
	if l.migrations[1].Func == nil || l.migrations[1].SQL != "" {
		t.Fatalf("002 should be the Go migration: %+v", l.migrations[1])
	}
	if !l.migrations[2].DisableTx {
		t.Fatal("003 should be disable-tx")
	}
	if got := l.migrations[3].SQL; got != "grant select on t to public;" {
		t.Fatalf("004 rendered %q", got)
	}
	if l.table.String() != "lanes_slow_version" {
		t.Fatalf("default version table %q", l.table)
	}
	if l.migrations[0].Checksum == l.migrations[3].Checksum || len(l.migrations[0].Checksum) != 64 {
		t.Fatal("checksums should be distinct sha256 hex")
	}
}

func TestLoadLaneErrors(t *testing.T) {
	cases := []struct {
		name     string
		lane     Lane
		file     string // the file the error must name
		contains string
	}{
		{"gap", Lane{Name: "fast", FS: fstest.MapFS{"001_a.sql": testkit.File("select 1"), "003_c.sql": testkit.File("select 1")}}, "003_c.sql", "missing migration 2"},
		{"duplicate", Lane{Name: "fast", FS: fstest.MapFS{"001_a.sql": testkit.File("select 1"), "1_b.sql": testkit.File("select 1")}}, "", "duplicate migration 1"},
		{"zero", Lane{Name: "fast", FS: fstest.MapFS{"000_a.sql": testkit.File("select 1")}}, "000_a.sql", "start at 1"},
		{"overflow", Lane{Name: "fast", FS: fstest.MapFS{"99999999999_a.sql": testkit.File("select 1")}}, "99999999999_a.sql", "int32"},
		{"bad name", Lane{Name: "fast", FS: fstest.MapFS{"001-a.sql": testkit.File("select 1")}}, "001-a.sql", "NNN_title.sql"},
		{"empty", Lane{Name: "fast", FS: fstest.MapFS{"README": testkit.File("x")}}, "", "no migrations"},
		{"nil fs", Lane{Name: "fast"}, "", "no migrations"},
		{"gitkeep and a file", Lane{Name: "fast", FS: fstest.MapFS{".gitkeep": testkit.File(""), "notes.txt": testkit.File("x")}}, "", "no migrations"},
		{"template", Lane{Name: "fast", FS: fstest.MapFS{"001_a.sql": testkit.File("select {{ .missing.deeper }}")}}, "001_a.sql", "template"},
		{"template syntax", Lane{Name: "fast", FS: fstest.MapFS{"001_a.sql": testkit.File("select {{ if }}")}}, "001_a.sql", ""},
		{"utf8", Lane{Name: "fast", FS: fstest.MapFS{"001_a.sql": testkit.File("select '\xff\xfe'")}}, "001_a.sql", "UTF-8"},
		{"only comments", Lane{Name: "fast", FS: fstest.MapFS{"001_a.sql": testkit.File("-- nothing\n/* here */;\n---- create above / drop below ----\ndrop table x;")}}, "001_a.sql", "no SQL statement"},
		{"lane name", Lane{Name: "Fast Lane", FS: fstest.MapFS{"001_a.sql": testkit.File("select 1")}}, "", "invalid lane name"},
		{"go duplicate", Lane{Name: "slow", FS: fstest.MapFS{"001_a.sql": testkit.File("select 1")}, Funcs: []GoMigration{{Version: 1, Name: "x", Up: noop}}}, "001_x.go", "duplicate migration 1"},
		{"go nil", Lane{Name: "slow", Funcs: []GoMigration{{Version: 1, Name: "x"}}}, "001_x.go", "no Up"},
		{"go zero", Lane{Name: "slow", Funcs: []GoMigration{{Version: 0, Name: "x", Up: noop}}}, "000_x.go", "start at 1"},
		{"bad table", Lane{Name: "slow", VersionTable: "a.b.c", FS: fstest.MapFS{"001_a.sql": testkit.File("select 1")}}, "", "invalid table name"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := loadLane(c.lane)
			var le *LoadError
			if !errors.As(err, &le) {
				t.Fatalf("err = %v, want a *LoadError", err)
			}
			if le.Lane != c.lane.Name {
				t.Errorf("error names lane %q, want %q", le.Lane, c.lane.Name)
			}
			if c.file != "" && le.File != c.file {
				t.Errorf("error names file %q, want %q (%v)", le.File, c.file, err)
			}
			if !strings.Contains(err.Error(), c.contains) {
				t.Errorf("error %q does not contain %q", err, c.contains)
			}
			if !strings.Contains(err.Error(), `lane "`+c.lane.Name+`"`) {
				t.Errorf("error %q does not name the lane", err)
			}
		})
	}
}

func TestNewValidatesLanes(t *testing.T) {
	cc, err := pgx.ParseConfig("postgres://u:secret@127.0.0.1:1/db")
	if err != nil {
		t.Fatal(err)
	}
	one := fstest.MapFS{"001_a.sql": testkit.File("select 1")}
	cases := []struct {
		name     string
		lanes    []Lane
		contains string
	}{
		{"none", nil, "no lanes"},
		{"twice", []Lane{{Name: "a", FS: one}, {Name: "a", FS: one}}, "listed twice"},
		{"shared table", []Lane{{Name: "a", FS: one}, {Name: "b", FS: one, VersionTable: "lanes_a_version"}}, "also used by lane"},
		{"order", []Lane{{Name: "a", Mode: Background, FS: one}, {Name: "b", Mode: Blocking, FS: one}}, "blocking lanes must come before"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := New(cc, c.lanes, Config{})
			if err == nil || !strings.Contains(err.Error(), c.contains) {
				t.Fatalf("err = %v, want it to contain %q", err, c.contains)
			}
		})
	}
	m, err := New(cc, []Lane{{Name: "a", FS: one}, {Name: "b", Mode: Background, FS: one}}, Config{})
	if err != nil {
		t.Fatal(err)
	}
	ka := m.lanes[0].lockKeys(resolvedTable{table: tableName{Schema: "public", Name: m.lanes[0].table.Name}})
	kb := m.lanes[1].lockKeys(resolvedTable{table: tableName{Schema: "public", Name: m.lanes[1].table.Name}})
	if len(ka) != 2 || len(kb) != 2 || ka[0] == kb[0] || ka[1] == kb[1] || ka[0] == 9628173550095224 || ka[1] == 9628173550095224 {
		t.Fatalf("lock keys must differ per lane and from tern's: %d %d", ka, kb)
	}
	if _, err := m.LockKey(context.Background(), nil, "c"); !errors.Is(err, ErrUnknownLane) {
		t.Fatalf("LockKey(c) = %v", err)
	}
}

func TestLanesFromFS(t *testing.T) {
	fsys := fstest.MapFS{
		"fast/001_a.sql": testkit.File("select 1"),
		"slow/001_a.sql": testkit.File("select 1"),
	}
	lanes, err := LanesFromFS(fsys, nil)
	if err != nil || len(lanes) != 2 || lanes[0].Name != "fast" || lanes[0].Mode != Blocking || lanes[1].Mode != Background {
		t.Fatalf("default lanes = %+v, %v", lanes, err)
	}
	fsys["reports/001_a.sql"] = testkit.File("select 1")
	if _, err := LanesFromFS(fsys, nil); err == nil || !strings.Contains(err.Error(), `"reports"`) {
		t.Fatalf("undeclared folder: err = %v", err)
	}
	decls := []LaneDecl{{Name: "fast", Mode: Blocking}, {Name: "slow", Mode: Background}, {Name: "reports", Mode: Background}}
	if lanes, err = LanesFromFS(fsys, decls); err != nil || len(lanes) != 3 || lanes[2].Mode != Background {
		t.Fatalf("declared lanes = %+v, %v", lanes, err)
	}
	if _, err := LanesFromFS(fsys, []LaneDecl{{Name: "fast"}, {Name: "slow", Mode: Background}, {Name: "reports", Mode: Background}, {Name: "nope", Mode: Background}}); err == nil || !strings.Contains(err.Error(), `no folder "nope"`) {
		t.Fatalf("missing folder: err = %v", err)
	}
}

func TestSplitStatements(t *testing.T) {
	cases := []struct {
		sql   string
		want  []string
		lines []int
	}{
		{"select 1; select 2;", []string{"select 1;", "select 2;"}, []int{1, 1}},
		{"select 1;\n\n-- c;\nselect ';' ;", []string{"select 1;", "-- c;\nselect ';' ;"}, []int{1, 3}},
		{"select $$a;b$$; select $x$ $$;$$ $x$;", []string{"select $$a;b$$;", "select $x$ $$;$$ $x$;"}, []int{1, 1}},
		{"create function f() returns int as $body$\nbegin\n  return 1;\nend;\n$body$ language plpgsql;\nselect 2", []string{"create function f() returns int as $body$\nbegin\n  return 1;\nend;\n$body$ language plpgsql;", "select 2"}, []int{1, 6}},
		{"/* a; /* nested; */ still; */ select 1;", []string{"/* a; /* nested; */ still; */ select 1;"}, []int{1}},
		{`select "a;b", 'it''s;', E'\';' from t; select 2`, []string{`select "a;b", 'it''s;', E'\';' from t;`, "select 2"}, []int{1, 1}},
		{"select a$1; select 2", []string{"select a$1;", "select 2"}, []int{1, 1}},
		{"-- only\n/* comments */;", nil, nil},
		{"\n\n  select 1", []string{"select 1"}, []int{3}},
		{"select 'a;\nb', \"x;\ny\", E'c\\\n;';\nselect 2", []string{"select 'a;\nb', \"x;\ny\", E'c\\\n;';", "select 2"}, []int{1, 5}},
		{"select 'unterminated;\n", []string{"select 'unterminated;"}, []int{1}},
		// Parentheses: a multi-action rule is one statement.
		{"create rule r as on insert to t do also (insert into a values (1); insert into b values (';'));\nselect 2",
			[]string{"create rule r as on insert to t do also (insert into a values (1); insert into b values (';'));", "select 2"}, []int{1, 2}},
		// A BEGIN ATOMIC body, with CASE ... END inside it, is one statement.
		{"CREATE OR REPLACE FUNCTION f(i int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT 1;\n  SELECT CASE WHEN i > 0 THEN 1 ELSE 2 END;\nEND;\nselect 3;",
			[]string{"CREATE OR REPLACE FUNCTION f(i int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT 1;\n  SELECT CASE WHEN i > 0 THEN 1 ELSE 2 END;\nEND;", "select 3;"}, []int{1, 6}},
		{"create procedure p() begin atomic insert into t values (1); end; call p();",
			[]string{"create procedure p() begin atomic insert into t values (1); end;", "call p();"}, []int{1, 1}},
		// BEGIN and END outside a routine split as usual; a word ending in begin is not BEGIN.
		{"begin; select 1 as begin_x; end; select case when true then 1 end;",
			[]string{"begin;", "select 1 as begin_x;", "end;", "select case when true then 1 end;"}, []int{1, 1, 1, 1}},
	}
	for _, c := range cases {
		got := splitStatements(c.sql)
		var sqls []string
		var lines []int
		for _, s := range got {
			sqls = append(sqls, s.SQL)
			lines = append(lines, s.Line)
		}
		if strings.Join(sqls, "|") != strings.Join(c.want, "|") || len(lines) != len(c.lines) {
			t.Errorf("split(%q) = %q, want %q", c.sql, sqls, c.want)
			continue
		}
		for i := range lines {
			if lines[i] != c.lines[i] {
				t.Errorf("split(%q) lines = %v, want %v", c.sql, lines, c.lines)
				break
			}
		}
	}
}

func FuzzSplitStatements(f *testing.F) {
	f.Add("select 1; select 'a;b'; select $$x;$$")
	f.Add("/* /* */ */ -- ;\n select E'\\'';")
	f.Fuzz(func(t *testing.T, sql string) {
		for _, st := range splitStatements(sql) {
			if !strings.Contains(sql, st.SQL) || st.Line < 1 || st.Line > strings.Count(sql, "\n")+1 {
				t.Fatalf("statement %q (line %d) not from %q", st.SQL, st.Line, sql)
			}
		}
	})
}

// A Go migration's checksum covers its name and Revision; without a Revision it is the checksum
// of earlier releases (sha256 of "go:" and the name), so upgrading reports no drift.
func TestGoMigrationChecksumCoversRevision(t *testing.T) {
	sum := func(g GoMigration) string {
		l, err := loadLane(Lane{Name: "slow", Funcs: []GoMigration{g}})
		if err != nil {
			t.Fatal(err)
		}
		return l.migrations[0].Checksum
	}
	base := sum(GoMigration{Version: 1, Name: "load", Up: noop})
	if want := goChecksumOfName(t, "001_load.go"); base != want {
		t.Fatalf("checksum without Revision = %s, want the earlier releases' %s", base, want)
	}
	r1 := sum(GoMigration{Version: 1, Name: "load", Revision: "1", Up: noop})
	r2 := sum(GoMigration{Version: 1, Name: "load", Revision: "2", Up: noop})
	renamed := sum(GoMigration{Version: 1, Name: "load2", Revision: "1", Up: noop})
	if r1 == base || r1 == r2 || r1 == renamed {
		t.Fatalf("checksums must differ by revision and name: base %s r1 %s r2 %s renamed %s", base, r1, r2, renamed)
	}
	if r1 != sum(GoMigration{Version: 1, Name: "load", Revision: "1", UpNoTx: func(context.Context, *pgx.Conn) error { return nil }}) {
		t.Fatal("same name and revision must give the same checksum")
	}
}

func goChecksumOfName(t *testing.T, name string) string {
	t.Helper()
	h := sha256.Sum256([]byte("go:" + name))
	return hex.EncodeToString(h[:])
}

func TestLaneInfoMigrationsAreCopies(t *testing.T) {
	cc, err := pgx.ParseConfig("postgres://nobody@localhost/none")
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(cc, []Lane{{Name: "fast", FS: fstest.MapFS{"001_a.sql": testkit.File("create table a (i int);")}}}, Config{})
	if err != nil {
		t.Fatal(err)
	}
	info, _ := m.Lane("fast")
	info.Migrations[0].SQL = "drop table everything;"
	info.Migrations[0] = nil
	if again, _ := m.Lane("fast"); again.Migrations[0] == nil || again.Migrations[0].SQL != "create table a (i int);" {
		t.Fatalf("a caller's change to LaneInfo.Migrations reached the Migrator: %+v", again.Migrations[0])
	}
}
