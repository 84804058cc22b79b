package migrator_test

import (
	"context"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

// TestLongFileProgressSaysWhatTheServerKnows runs a concurrent index build that waits for a
// writer: while it waits, the progress names the file, the build's phase and the elapsed time,
// read from pg_stat_progress_create_index on a second connection, and is announced; once the
// migration commits, no progress is left.
func TestLongFileProgressSaysWhatTheServerKnows(t *testing.T) {
	t.Parallel()
	cc, conn := setup(t)
	ctx := ctxT(t)
	sparseItems(t, conn, 100)
	m := newMigrator(t, cc, migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{
		"001_index.sql": testkit.File("---- tern: disable-tx ----\ncreate index concurrently items_n on items (n);")}})
	if _, err := conn.Exec(ctx, "listen lanes_done"); err != nil {
		t.Fatal(err)
	}
	writer, err := engine.Connect(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close(context.Background())
	tx, err := writer.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "update items set n = n where id = 3"); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { _, err := m.Migrate(ctx, "slow"); errc <- err }()
	// The announcement comes first: the progress row is written in the same batch.
	for {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		if err != nil {
			t.Fatalf("no progress announced: %v", err)
		}
		ev, err := wire.Parse(n.Payload)
		if err == nil && ev.Progress != nil && strings.Contains(ev.Progress.Phase, "waiting for writers") {
			break
		}
	}
	st, err := m.Status(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	p := st[0].Progress
	if p == nil || p.File != "001_index.sql" || !strings.HasPrefix(p.Phase, "create index: waiting for writers") || p.ElapsedSeconds == nil || *p.ElapsedSeconds < 1 {
		t.Fatalf("progress = %+v", p)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if st, err := m.Status(ctx, conn); err != nil || st[0].Progress != nil || st[0].State != migrator.StateDone {
		t.Fatalf("after the build: %+v, %v", st, err)
	}
}
