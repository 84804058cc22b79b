package migrator

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/pgtest"
)

// TestEndSilentSparesAllButTheSilentHolder: endSilent ends a session only when, in the same
// statement, the lease row still has the epoch and pid it was found with, its heartbeat has
// expired, that session holds the lane's lock, and it is the session that took the lease (not
// a newer backend given the same pid). Each case but the last leaves the session alive.
func TestEndSilentSparesAllButTheSilentHolder(t *testing.T) {
	t.Parallel()
	url := pgtest.NewDB(t)
	cc, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	m, err := New(cc, []Lane{{Name: "x", Funcs: []GoMigration{{Version: 1, Name: "noop", Up: func(context.Context, pgx.Tx) error { return nil }}}}}, Config{})
	if err != nil {
		t.Fatal(err)
	}
	admin := pgtest.Connect(t, url)
	if err := m.ensureLeaseTable(ctx, admin); err != nil {
		t.Fatal(err)
	}
	holder := pgtest.Connect(t, url)
	const key = int64(0x1234_5678_9abc)
	pid := pgtest.Scalar[int32](t, holder, "select pg_backend_pid()")
	if _, err := holder.Exec(ctx, "select pg_advisory_lock($1)", key); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Exec(ctx, `insert into lanes_lease (key, lane, holder, session_pid, epoch, expires_at, acquired_at)
values ($1, 'x', 'the holder', $2, 7, clock_timestamp() - interval '1 s', clock_timestamp())`, key, pid); err != nil {
		t.Fatal(err)
	}
	found := func(epoch int64, pid int32) silent {
		k := key
		return silent{key: &k, epoch: &epoch, pid: &pid}
	}
	alive := func(what string) {
		t.Helper()
		if err := holder.Ping(ctx); err != nil {
			t.Fatalf("%s: the holder's session was ended: %v", what, err)
		}
	}
	set := func(sql string) {
		t.Helper()
		if _, err := admin.Exec(ctx, "update lanes_lease set "+sql+" where lane = 'x'"); err != nil {
			t.Fatal(err)
		}
	}

	if m.endSilent(ctx, admin, "x", found(6, pid)) {
		t.Error("ended a session found under another epoch (a new holder's)")
	}
	alive("another epoch")
	if m.endSilent(ctx, admin, "x", found(7, pid+1)) {
		t.Error("ended a session found with another pid")
	}
	alive("another pid")
	set("expires_at = clock_timestamp() + interval '1 min'")
	if m.endSilent(ctx, admin, "x", found(7, pid)) {
		t.Error("ended a holder whose heartbeat was renewed since it was found")
	}
	alive("renewed")
	set("expires_at = clock_timestamp() - interval '1 s', acquired_at = '2000-01-01'")
	if m.endSilent(ctx, admin, "x", found(7, pid)) {
		t.Error("ended a session that started after the lease was taken (the pid of another backend)")
	}
	alive("a newer backend with the pid")
	set("acquired_at = clock_timestamp(), key = key + 1")
	other, epoch := key+1, int64(7)
	if m.endSilent(ctx, admin, "x", silent{key: &other, epoch: &epoch, pid: &pid}) {
		t.Error("ended a session that does not hold the lease's lock")
	}
	alive("not holding the lock")
	set("key = key - 1")
	if s, err := m.endSilentHolder(ctx, admin, "x"); err != nil || !s {
		t.Fatalf("endSilentHolder = %v, %v; want the silent holder ended", s, err)
	}
	var pgErr *pgconn.PgError
	deadline := time.Now().Add(time.Minute)
	for {
		err := holder.Ping(ctx)
		if errors.As(err, &pgErr) && pgErr.Code == "57P01" || err != nil && holder.IsClosed() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the silent holder's session still answers: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestWatchedConnAwaiting: a client that sent something and read nothing since is waiting for
// an answer, for as long as since the send; an answer read, even while the send was still
// under way, ends the wait.
func TestWatchedConnAwaiting(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	w := &watchedConn{Conn: client}
	if d := w.awaiting(); d != 0 {
		t.Fatalf("a connection that sent nothing waits %s", d)
	}
	go func() {
		buf := make([]byte, 4)
		_, _ = io.ReadFull(server, buf)
	}()
	if _, err := w.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if d := w.awaiting(); d < 20*time.Millisecond {
		t.Fatalf("waits %s after a send 20 ms ago with no answer", d)
	}
	go func() { _, _ = server.Write([]byte("pong")) }()
	if _, err := io.ReadFull(w, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	if d := w.awaiting(); d != 0 {
		t.Fatalf("waits %s after the answer was read", d)
	}
	// An answer that arrives while a send is still being written (pgconn reads in the
	// background during a long write) ends the wait too.
	before := w.wrote.Load()
	sent := make(chan error, 1)
	go func() { _, err := w.Write([]byte("slow")); sent <- err }() // blocks until server reads
	for deadline := time.Now().Add(10 * time.Second); w.wrote.Load() == before; {
		if time.Now().After(deadline) {
			t.Fatal("the send did not begin")
		}
		time.Sleep(time.Millisecond)
	}
	go func() { _, _ = server.Write([]byte("early")) }()
	if _, err := io.ReadFull(w, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(server, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if d := w.awaiting(); d != 0 {
		t.Fatalf("waits %s although the answer came during the send", d)
	}
}
