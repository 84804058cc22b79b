package migrator

import (
	"context"
	"errors"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/testkit"
)

func TestBatchDirective(t *testing.T) {
	l, err := loadLane(Lane{Name: "slow", Mode: Background, FS: fstest.MapFS{
		"001_fill.sql":  testkit.File("---- lanes: batch table=app.users key=id size=250 ----\nupdate app.users set n = n + 1 where id > $1 and id <= $2;\n---- create above / drop below ----\n"),
		"002_plain.sql": testkit.File("select 1;"),
	}})
	if err != nil {
		t.Fatal(err)
	}
	b := l.migrations[0].batch
	if b == nil || b.table != (tableName{Schema: "app", Name: "users"}) || b.key != "id" || b.size != 250 ||
		b.sql != "update app.users set n = n + 1 where id > $1 and id <= $2;" || !l.migrations[0].Batched() {
		t.Fatalf("batch = %+v", b)
	}
	if l.migrations[1].Batched() {
		t.Fatal("a plain file is not batched")
	}
	l, err = loadLane(Lane{Name: "slow", Mode: Background, FS: fstest.MapFS{
		"001_fill.sql": testkit.File("---- lanes: batch table=t key=k ----\nupdate t set n = 1 where k > $1 and k <= $2"),
	}})
	if err != nil || l.migrations[0].batch.size != defaultBatchSize {
		t.Fatalf("default size: %v", err)
	}
}

func TestBatchDirectiveErrors(t *testing.T) {
	const stmt = "\nupdate t set n = 1 where k > $1 and k <= $2;"
	for _, tc := range []struct{ name, sql, want string }{
		{"unknown option", "---- lanes: batch table=t key=k width=3 ----" + stmt, `unknown option "width"`},
		{"missing table", "---- lanes: batch key=k ----" + stmt, "missing table"},
		{"missing key", "---- lanes: batch table=t ----" + stmt, "missing key"},
		{"bad size", "---- lanes: batch table=t key=k size=0 ----" + stmt, "size=0"},
		{"unknown directive", "---- lanes: chunk table=t key=k ----" + stmt, "unknown directive"},
		{"malformed", "---- lanes: batch table=t key=k" + stmt, "malformed directive"},
		{"no $2", "---- lanes: batch table=t key=k ----\nupdate t set n = 1 where k > $1;", "must use $1"},
		{"two statements", "---- lanes: batch table=t key=k ----" + stmt + stmt, "exactly one statement"},
		{"not first line", "select 1;\n---- lanes: batch table=t key=k ----" + stmt, "first line"},
		{"disable-tx", "---- lanes: batch table=t key=k ----\n---- tern: disable-tx ----" + stmt, "disable-tx"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadLane(Lane{Name: "slow", Mode: Background, FS: fstest.MapFS{"001_fill.sql": testkit.File(tc.sql)}})
			var le *LoadError
			if !errors.As(err, &le) || le.File != "001_fill.sql" || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want a LoadError naming 001_fill.sql and %q", err, tc.want)
			}
		})
	}
	rangeFn := func(context.Context, pgx.Tx, int64, int64) error { return nil }
	for _, tc := range []struct {
		name string
		g    GoMigration
		want string
	}{
		{"both", GoMigration{Version: 1, Name: "x", Up: noop, Backfill: &Backfill{Table: "t", Key: "k", Range: rangeFn}}, "both Up and Backfill"},
		{"no func", GoMigration{Version: 1, Name: "x", Backfill: &Backfill{Table: "t", Key: "k"}}, "set Range or Cursor"},
		{"no table", GoMigration{Version: 1, Name: "x", Backfill: &Backfill{Range: rangeFn}}, "needs Table and Key"},
		{"no tx", GoMigration{Version: 1, Name: "x", UpNoTx: func(context.Context, *pgx.Conn) error { return nil }, Backfill: &Backfill{Table: "t", Key: "k", Range: rangeFn}}, "both Up and Backfill"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadLane(Lane{Name: "slow", Mode: Background, Funcs: []GoMigration{tc.g}})
			var le *LoadError
			if !errors.As(err, &le) || le.File != "001_x.go" || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want a LoadError naming 001_x.go and %q", err, tc.want)
			}
		})
	}
}

func TestSizer(t *testing.T) {
	target := 100 * time.Millisecond
	s := newSizer(100, target)
	// An idle table: 100 rows in 1 ms. Growth is bounded by 1.2x per batch.
	prev := s.size
	for range 10 {
		s.observe(s.size, time.Millisecond)
		if s.size > int(float64(prev)*1.2)+1 {
			t.Fatalf("grew from %d to %d in one step", prev, s.size)
		}
		if s.size <= prev {
			t.Fatalf("did not grow on an idle table: %d -> %d", prev, s.size)
		}
		prev = s.size
	}
	// A batch far over the target (more than 5x) cuts the size tenfold at once.
	before := s.size
	s.observe(s.size, 6*target)
	if s.size != before/10 {
		t.Fatalf("after a batch 6x over target: %d, want %d", s.size, before/10)
	}
	// Steady at 1 ms per row: the size settles near target/1ms = 100 rows.
	for range 60 {
		s.observe(s.size, time.Duration(s.size)*time.Millisecond)
	}
	if s.size < 90 || s.size > 110 {
		t.Fatalf("size = %d, want about 100", s.size)
	}
	// A batch over the target (but under 5x) never grows the size: it shrinks in proportion.
	before = s.size
	s.observe(s.size, 2*target)
	if s.size > before/2+1 {
		t.Fatalf("after a batch at twice the target: %d, want at most %d", s.size, before/2+1)
	}
	for range 60 {
		s.observe(s.size, time.Duration(s.size)*time.Millisecond)
	}
	// A short last batch (the walk's end) does not make the size grow.
	s.observe(3, time.Microsecond)
	if s.size > 110 {
		t.Fatalf("a short batch made the size grow to %d", s.size)
	}
	s.shrink()
	if s.size < 1 || s.size > 11 {
		t.Fatalf("shrink: %d", s.size)
	}
	// A loaded server: every batch costs 3x the target whatever its size. The size settles at
	// its floor, a tenth of the start, instead of collapsing to one row.
	s = newSizer(1000, target)
	for range 50 {
		s.observe(s.size, 3*target)
	}
	if s.size != 100 {
		t.Fatalf("size under a fixed cost over the target = %d, want the floor 100", s.size)
	}
	// A timed-out batch is still narrowed below the floor.
	s.shrink()
	s.shrink()
	if s.size != 1 {
		t.Fatalf("shrink below the floor: %d", s.size)
	}
}

// A resumed walk keeps the floor of its configured start, whatever size it stopped at.
func TestResumedSizerKeepsTheFloor(t *testing.T) {
	if s := resumeSizer(200, 2, 50*time.Millisecond); s.size != 20 || s.min != 20 {
		t.Errorf("resumed at 2 rows of a 200-row start: size %d, floor %d; want 20, 20", s.size, s.min)
	}
	if s := resumeSizer(200, 500, 50*time.Millisecond); s.size != 500 {
		t.Errorf("resumed at 500 rows: size %d", s.size)
	}
}
