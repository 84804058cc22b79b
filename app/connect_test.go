package app_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// TestBeforeConnectRunsForEveryConnection: a library user's BeforeConnect (an IAM token, say)
// sees every connection the Migrator and the Runtime open: the configuration names a database
// that does not exist, and only the hook makes it right, so any connection opened without it
// fails.
func TestBeforeConnectRunsForEveryConnection(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	wrong := e.cc.Copy()
	wrong.Database = "no_such_database_before_connect"
	var calls atomic.Int64
	before := func(_ context.Context, cc *pgx.ConnConfig) error {
		n := calls.Add(1)
		cc.Database = e.cc.Database
		cc.RuntimeParams["application_name"] = fmt.Sprintf("token-%d", n)
		return nil
	}
	lanes := []migrator.Lane{
		{Name: "fast", FS: fstest.MapFS{"001_a.sql": testkit.File("create table a (i int);")}},
		{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"001_b.sql": testkit.File("create table b (i int);")}},
	}
	m, err := migrator.New(wrong, lanes, migrator.Config{BeforeConnect: before})
	if err != nil {
		t.Fatal(err)
	}
	r, err := app.New(m, app.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitDone(t, r, "slow")
	if _, err := r.Status(ctx); err != nil {
		t.Fatalf("status read: %v", err)
	}
	// The listener, the fast lane's migration, the slow lane's and the status read at least.
	if n := calls.Load(); n < 4 {
		t.Errorf("BeforeConnect called %d times, want at least 4", n)
	}

	// An error from the hook fails the attempt, wrapped.
	refused := errors.New("no token today")
	m2, err := migrator.New(e.cc, lanes, migrator.Config{BeforeConnect: func(context.Context, *pgx.ConnConfig) error { return refused }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m2.Migrate(ctx, "fast"); !errors.Is(err, refused) {
		t.Fatalf("Migrate with a refusing BeforeConnect: %v, want it wrapped", err)
	}
}

// TestRuntimeIgnoresPGEnvironment: the Runtime connects with the Migrator's configuration
// only; the process's PG* variables (read by pgx.ParseConfig and pgxpool.ParseConfig) play no
// part behind the user's back.
func TestRuntimeIgnoresPGEnvironment(t *testing.T) {
	e := newEnv(t)
	t.Setenv("PGPORT", "not-a-port")
	t.Setenv("PGHOST", "/nonexistent")
	t.Setenv("PGDATABASE", "no_such_database")
	r := e.replica(migrator.Lane{Name: "fast", FS: fstest.MapFS{"001_a.sql": testkit.File("create table a (i int);")}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := r.Status(ctx); err != nil {
		t.Fatalf("status read with PG* variables set: %v", err)
	}
}
