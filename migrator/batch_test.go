package migrator_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

// sparseItems creates items(id int4 primary key, n int) with rows at every third key from 3 to
// 3*rows, so arithmetic ranges would be two-thirds empty.
func sparseItems(t *testing.T, conn *pgx.Conn, rows int) {
	t.Helper()
	if _, err := conn.Exec(context.Background(), fmt.Sprintf(`create table items (id int4 primary key, n int not null default 0, note text);
insert into items (id) select 3 * g from generate_series(1, %d) g; analyze items`, rows)); err != nil {
		t.Fatal(err)
	}
}

func batchedMigrator(t *testing.T, cc *pgx.ConnConfig, bc migrator.BatchConfig, lanes ...migrator.Lane) *migrator.Migrator {
	t.Helper()
	m, err := migrator.New(cc, lanes, migrator.Config{LockPollInterval: 20 * time.Millisecond, Batch: bc})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

const countVisits = "---- lanes: batch table=items key=id size=100 ----\nupdate items set n = n + 1 where id > $1 and id <= $2;"

func TestBatchedFileVisitsEveryRowOnce(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	sparseItems(t, conn, 5000)
	m := newMigrator(t, cc, migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"001_visit.sql": testkit.File(countVisits)}})
	if _, err := conn.Exec(ctx, "listen lanes_done"); err != nil {
		t.Fatal(err)
	}
	res, err := m.Migrate(ctx, "slow")
	if err != nil || res.To != 1 || res.Applied != 1 {
		t.Fatalf("migrate = %+v, %v", res, err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from items where n <> 1"); n != 0 {
		t.Fatalf("%d rows not visited exactly once", n)
	}
	// The walk is recorded: done = every key, in several batches, finished.
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_progress where lane = 'slow' and version = 1 and done = 5000 and total = 5000 and batches > 1 and finished_at is not null and cursor = '15000'"); n != 1 {
		t.Fatal("progress row does not record the finished walk")
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where lane = 'slow' and version = 1 and error is null"); n != 1 {
		t.Fatal("no history row")
	}
	// The completion is announced after the last batch, after at least one progress hint.
	var sawProgress bool
	for {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		if err != nil {
			t.Fatalf("no completion notification: %v", err)
		}
		ev, err := wire.Parse(n.Payload)
		if err != nil {
			t.Fatal(err)
		}
		if ev.Progress != nil {
			sawProgress = true
			if ev.Progress.Total != 5000 || ev.Progress.Done <= 0 || len(n.Payload) > 200 {
				t.Fatalf("progress payload %s", n.Payload)
			}
			continue
		}
		if ev.Lane != "slow" || ev.Version != 1 || ev.State != wire.Done || !sawProgress {
			t.Fatalf("event %+v (progress seen: %v)", ev, sawProgress)
		}
		break
	}
	st, err := m.Status(ctx, conn)
	if err != nil || st[0].State != migrator.StateDone || st[0].Progress != nil {
		t.Fatalf("status = %+v, %v", st, err)
	}
}

func TestBatchedEmptyTableIsDone(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	sparseItems(t, conn, 0)
	m := newMigrator(t, cc, migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"001_visit.sql": testkit.File(countVisits)}})
	if res, err := m.Migrate(ctx, "slow"); err != nil || res.To != 1 {
		t.Fatalf("migrate = %+v, %v", res, err)
	}
}

func TestBatchedBadTargetFailsBeforeChangingAnything(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	if _, err := conn.Exec(ctx, "create table texts (id text primary key, n int); create table nokey (id int, n int)"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ table, key, want string }{
		{"missing", "id", "batch table missing does not exist"},
		{"texts", "id", `batch key "id" of texts is text`},
		{"texts", "nope", `batch key "nope" is not a column of texts`},
		{"nokey", "id", "no unique index"},
	} {
		lane := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"001_walk.sql": testkit.File(
			fmt.Sprintf("---- lanes: batch table=%s key=%s ----\nupdate %s set n = 1 where %s > $1 and %s <= $2", tc.table, tc.key, tc.table, tc.key, tc.key))}}
		m := newMigrator(t, cc, lane)
		_, err := m.Migrate(ctx, "slow")
		var me *migrator.MigrationError
		if !errors.As(err, &me) || me.File != "001_walk.sql" || me.Transient() || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("%s.%s: err = %v, want a permanent error naming the file and %q", tc.table, tc.key, err, tc.want)
		}
		if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_progress"); n != 0 {
			t.Fatalf("%s.%s: a walk was recorded", tc.table, tc.key)
		}
		if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where error like $1", "%"+tc.want+"%"); n != 1 {
			t.Fatalf("%s.%s: failure not recorded", tc.table, tc.key)
		}
	}
}

// TestBatchedResumesAfterInterruption interrupts a walk in the middle of a batch, twice (a
// cancelled context, then a terminated session), and checks that the next run continues from
// the last committed batch: every row visited exactly once, the frozen upper end kept.
func TestBatchedResumesAfterInterruption(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	sparseItems(t, conn, 3000)
	var (
		calls   atomic.Int32
		stopAt  atomic.Int32
		stop    context.CancelFunc
		applier atomic.Int32 // backend pid of the applying session
	)
	walk := func(ctx context.Context, tx pgx.Tx, lo, hi int64) error {
		if calls.Add(1) == 1 {
			// Rows inserted after the walk started are beyond its frozen end: not visited.
			if _, err := conn.Exec(context.Background(), "insert into items (id) values (100000)"); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, "update items set n = n + 1 where id > $1 and id <= $2", lo, hi); err != nil {
			return err
		}
		var pid int32
		if err := tx.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid); err != nil {
			return err
		}
		applier.Store(pid)
		switch calls.Load() {
		case stopAt.Load():
			stop() // the batch's work is done but not committed
			<-ctx.Done()
			return ctx.Err()
		case stopAt.Load() + 5:
			// Kill the session from outside while the batch's transaction is open.
			if _, err := conn.Exec(context.Background(), "select pg_terminate_backend($1)", pid); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "select 1")
			return err
		}
		return nil
	}
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{
		{Version: 1, Name: "visit", Backfill: &migrator.Backfill{Table: "items", Key: "id", Size: 50, Range: walk}}}}
	m := batchedMigrator(t, cc, migrator.BatchConfig{Target: 5 * time.Millisecond}, lane)

	stopAt.Store(4)
	rctx, cancel := context.WithCancel(ctx)
	stop = cancel
	if _, err := m.Migrate(rctx, "slow"); !errors.Is(err, context.Canceled) {
		t.Fatalf("first run: %v", err)
	}
	cancel()
	if n := pgtest.Scalar[int](t, conn, "select count(*) from items where n > 1"); n != 0 {
		t.Fatal("rows visited twice")
	}
	done1 := pgtest.Scalar[int](t, conn, "select done from lanes_progress where lane = 'slow'")
	if done1 == 0 || done1 != pgtest.Scalar[int](t, conn, "select count(*) from items where n = 1") {
		t.Fatalf("after the cancel: done %d does not match the rows visited", done1)
	}
	// Second run: the session is terminated in the middle of a batch: a transient error.
	stop = func() {}
	_, err := m.Migrate(ctx, "slow")
	if err == nil || !migrator.IsTransient(err) {
		t.Fatalf("second run: %v, want a transient error", err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from items where n > 1"); n != 0 {
		t.Fatal("rows visited twice")
	}
	if done2 := pgtest.Scalar[int](t, conn, "select done from lanes_progress where lane = 'slow'"); done2 <= done1 || done2 != pgtest.Scalar[int](t, conn, "select count(*) from items where n = 1") {
		t.Fatalf("after the termination: done %d", done2)
	}
	// Third run finishes.
	if res, err := m.Migrate(ctx, "slow"); err != nil || res.To != 1 {
		t.Fatalf("third run = %+v, %v", res, err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from items where id <= 9000 and n <> 1"); n != 0 {
		t.Fatalf("%d rows not visited exactly once", n)
	}
	if n := pgtest.Scalar[int](t, conn, "select n from items where id = 100000"); n != 0 {
		t.Fatal("a row inserted after the walk started was visited")
	}
}

// visitWords is a Cursor batch over the words table: it adds one to n of the next size words
// after cursor, in word order.
func visitWords(ctx context.Context, tx pgx.Tx, cursor string, size int) (string, bool, error) {
	var last *string
	err := tx.QueryRow(ctx, `with b as (select w from words where w > $1 order by w limit $2), u as (update words set n = n + 1 where w in (select w from b))
select max(w) from b`, cursor, size).Scan(&last)
	if err != nil || last == nil {
		return cursor, true, err
	}
	return *last, false, nil
}

func TestBatchedCursorForm(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	if _, err := conn.Exec(ctx, "create table words (w text primary key, n int not null default 0); insert into words (w) select md5(g::text) from generate_series(1, 1000) g"); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{{Version: 1, Name: "words", Backfill: &migrator.Backfill{Size: 64,
		Cursor: func(ctx context.Context, tx pgx.Tx, cursor string, size int) (string, bool, error) {
			if calls.Add(1) == 3 {
				return "", false, errors.New("flaky")
			}
			return visitWords(ctx, tx, cursor, size)
		}}}}}
	m := batchedMigrator(t, cc, migrator.BatchConfig{Target: 5 * time.Millisecond}, lane)
	if _, err := m.Migrate(ctx, "slow"); err == nil || !strings.Contains(err.Error(), "flaky") || !strings.Contains(err.Error(), "001_words.go") {
		t.Fatalf("first run: %v", err)
	}
	if res, err := m.Migrate(ctx, "slow"); err != nil || res.To != 1 {
		t.Fatalf("second run = %+v, %v", res, err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from words where n <> 1"); n != 0 {
		t.Fatalf("%d words not visited exactly once", n)
	}
}

func TestBatchedStatementErrorNamesTheRange(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	sparseItems(t, conn, 1000)
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"001_div.sql": testkit.File(
		"---- lanes: batch table=items key=id size=100 ----\nupdate items set n = n + 1 + 100 / (id - 1500) * 0 where id > $1 and id <= $2;")}}
	m := newMigrator(t, cc, lane)
	_, err := m.TryMigrate(ctx, "slow")
	var me *migrator.MigrationError
	if !errors.As(err, &me) || me.SQLState != "22012" || me.File != "001_div.sql" || !strings.Contains(me.Statement, "100 / (id - 1500)") ||
		!strings.Contains(err.Error(), "batch (") {
		t.Fatalf("err = %v", err)
	}
	// The batches before the bad one stay committed; the walk's cursor is below 1500.
	cursor := pgtest.Scalar[int](t, conn, "select cursor::int from lanes_progress")
	if cursor <= 0 || cursor >= 1500 || pgtest.Scalar[int](t, conn, "select count(*) from items where n = 0 and id <= $1", cursor) != 0 {
		t.Fatalf("cursor %d", cursor)
	}
	// Not retried unchanged; Retry clears the failure once the data is fixed by hand.
	if _, err := m.TryMigrate(ctx, "slow"); !errors.Is(err, migrator.ErrFailedBefore) {
		t.Fatalf("retry without a change: %v", err)
	}
	if st, _ := m.Status(ctx, conn); st[0].State != migrator.StateFailed {
		t.Fatalf("state = %s", st[0].State)
	}
	if _, err := conn.Exec(ctx, "delete from items where id = 1500"); err != nil {
		t.Fatal(err)
	}
	if cleared, err := m.Retry(ctx, conn, "slow"); err != nil || !cleared {
		t.Fatalf("retry = %v, %v", cleared, err)
	}
	if st, _ := m.Status(ctx, conn); st[0].State != migrator.StatePending || st[0].Failure != nil {
		t.Fatalf("after retry: %+v", st[0])
	}
	if res, err := m.TryMigrate(ctx, "slow"); err != nil || res.To != 1 {
		t.Fatalf("after retry = %+v, %v", res, err)
	}
	if cleared, err := m.Retry(ctx, conn, "slow"); err != nil || cleared {
		t.Fatalf("retry with nothing failed = %v, %v", cleared, err)
	}
}

func TestBatchedTimeoutRetriesSmallerThenNamesTheRange(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	sparseItems(t, conn, 400)
	// A batch wider than 20 keys sleeps past the statement timeout: the walk shrinks and passes.
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"001_slow.sql": testkit.File(
		"---- lanes: batch table=items key=id size=200 ----\nupdate items set n = n + 1 where id > $1 and id <= $2 and pg_sleep(case when $2::int - $1::int > 60 then 1 else 0 end) is not null;")}}
	m := batchedMigrator(t, cc, migrator.BatchConfig{Target: 10 * time.Millisecond, StatementTimeout: 300 * time.Millisecond}, lane)
	if res, err := m.Migrate(ctx, "slow"); err != nil || res.To != 1 {
		t.Fatalf("migrate = %+v, %v", res, err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from items where n <> 1"); n != 0 {
		t.Fatalf("%d rows not visited exactly once", n)
	}
	// Every batch times out: after the retries the failure names the range and the timeout.
	lane.Name = "slower"
	lane.FS = fstest.MapFS{"001_stuck.sql": testkit.File("---- lanes: batch table=items key=id size=10 ----\nupdate items set n = n + 1 where id > $1 and id <= $2 and pg_sleep(1) is not null;")}
	m = batchedMigrator(t, cc, migrator.BatchConfig{Target: 10 * time.Millisecond, StatementTimeout: 200 * time.Millisecond}, lane)
	_, err := m.Migrate(ctx, "slower")
	var me *migrator.MigrationError
	if !errors.As(err, &me) || me.SQLState != "57014" || !strings.Contains(err.Error(), "batch (2, 3]") || me.Line != 2 || strings.Contains(me.Statement, "lanes:") {
		t.Fatalf("err = %v", err)
	}
}

func TestPauseStopsAtTheNextBatchAndResumeContinues(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	sparseItems(t, conn, 2000)
	var calls atomic.Int32
	var m *migrator.Migrator
	walk := func(ctx context.Context, tx pgx.Tx, lo, hi int64) error {
		if calls.Add(1) == 3 {
			// An operator pauses the lane while this batch runs: it still commits.
			pc, err := engine.Connect(ctx, m)
			if err != nil {
				return err
			}
			defer pc.Close(context.Background())
			if err := m.Pause(ctx, pc, "slow"); err != nil {
				return err
			}
		}
		_, err := tx.Exec(ctx, "update items set n = n + 1 where id > $1 and id <= $2", lo, hi)
		return err
	}
	m = batchedMigrator(t, cc, migrator.BatchConfig{Target: 5 * time.Millisecond},
		migrator.Lane{Name: "fast", FS: twoFiles},
		migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{
			{Version: 1, Name: "visit", Backfill: &migrator.Backfill{Table: "items", Key: "id", Size: 20, Range: walk}}}})
	if err := m.Pause(ctx, conn, "fast"); err == nil {
		t.Fatal("a blocking lane was paused")
	}
	_, err := m.TryMigrate(ctx, "slow")
	if !errors.Is(err, migrator.ErrPaused) {
		t.Fatalf("err = %v, want ErrPaused", err)
	}
	if c := calls.Load(); c != 3 {
		t.Fatalf("%d batches ran, want 3 (the pause is honoured at the next batch boundary)", c)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from lanes_history where error is not null"); n != 0 {
		t.Fatal("a pause was recorded as a failure")
	}
	st, err := m.Status(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	p := st[1].Progress
	visited := pgtest.Scalar[int](t, conn, "select count(*) from items where n = 1")
	if st[1].State != migrator.StatePaused || !st[1].Paused || p == nil || p.Done != int64(visited) || p.Total != 2000 || p.Percent == nil ||
		*p.Percent != math.Round(float64(visited)/2000*1000)/10 || p.File != "001_visit.go" {
		t.Fatalf("status = %+v, progress %+v", st[1], p)
	}
	// Paused, no replica starts it: nothing runs.
	if _, err := m.Migrate(ctx, "slow"); !errors.Is(err, migrator.ErrPaused) || calls.Load() != 3 {
		t.Fatalf("migrate while paused: %v, %d batches", err, calls.Load())
	}
	if err := m.Resume(ctx, conn, "slow"); err != nil {
		t.Fatal(err)
	}
	if res, err := m.Migrate(ctx, "slow"); err != nil || res.To != 1 {
		t.Fatalf("after resume = %+v, %v", res, err)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from items where n <> 1"); n != 0 {
		t.Fatalf("%d rows not visited exactly once", n)
	}
}

// A Cursor walk with Total has a percent and an ETA while it runs, like a keyed walk.
func TestBatchedCursorFormWithTotalHasAPercent(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	if _, err := conn.Exec(ctx, "create table words (w text primary key, n int not null default 0); insert into words (w) select md5(g::text) from generate_series(1, 1000) g"); err != nil {
		t.Fatal(err)
	}
	var m *migrator.Migrator
	var calls int
	var seen *migrator.Progress
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{{Version: 1, Name: "words", Backfill: &migrator.Backfill{Size: 100,
		Total: func(ctx context.Context, q migrator.Querier) (int64, error) {
			var n int64
			err := q.QueryRow(ctx, "select count(*) from words").Scan(&n)
			return n, err
		},
		Cursor: func(ctx context.Context, tx pgx.Tx, cursor string, size int) (string, bool, error) {
			if calls++; calls == 4 { // three batches committed: what does status say?
				st, err := m.Status(ctx, conn)
				if err != nil {
					return "", false, err
				}
				seen = st[0].Progress
			}
			return visitWords(ctx, tx, cursor, size)
		}}}}}
	m = batchedMigrator(t, cc, migrator.BatchConfig{Target: 5 * time.Millisecond}, lane)
	if res, err := m.Migrate(ctx, "slow"); err != nil || res.To != 1 {
		t.Fatalf("Migrate = %+v, %v", res, err)
	}
	if seen == nil || seen.Total != 1000 || seen.Done <= 0 || seen.Done >= 1000 || seen.Percent == nil || seen.ETASeconds == nil ||
		*seen.Percent != math.Round(float64(seen.Done)/10*10)/10 {
		t.Fatalf("progress after three batches of 1000 words = %+v, want done/total as a percent and an ETA", seen)
	}
	if n := pgtest.Scalar[int](t, conn, "select count(*) from words where n <> 1"); n != 0 {
		t.Fatalf("%d words not visited exactly once", n)
	}
}
