package pgconnect_test

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/internal/pgconnect"
	"github.com/multilanes/lanes/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.RunMain(m) }

// A multi-host URL whose first host answers with a FATAL 3D000 (the database does not exist
// there, as on a standby that has not replayed CREATE DATABASE yet) connects to the next host;
// pgx alone stops at the first host.
func TestConnectTriesTheNextHostAfter3D000(t *testing.T) {
	t.Parallel()
	if _, err := pgcluster.FindBinaries(); err != nil {
		if os.Getenv("LANES_TEST_REQUIRE_DB") == "1" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	empty, err := pgcluster.Start(ctx, pgcluster.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { empty.Stop() })
	serving, err := pgx.ParseConfig(pgtest.NewDB(t))
	if err != nil {
		t.Fatal(err)
	}
	if serving.Host == "" || serving.Host[0] == '/' {
		t.Skip("the test server is reached through a socket; this test needs two TCP hosts")
	}
	url := fmt.Sprintf("postgres://%s@127.0.0.1:%d,%s:%d/%s?sslmode=disable&connect_timeout=5",
		serving.User, empty.Port(), serving.Host, serving.Port, serving.Database)
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	if conn, err := pgx.ConnectConfig(ctx, cfg); err == nil {
		conn.Close(ctx)
		t.Fatal("pgx alone connected: the first host does have the database, the test proves nothing")
	}
	conn, err := pgconnect.Connect(ctx, cfg)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(ctx)
	if got := conn.PgConn().Conn().RemoteAddr().String(); got != fmt.Sprintf("%s:%d", serving.Host, serving.Port) {
		t.Errorf("connected to %s, want the second host %s:%d", got, serving.Host, serving.Port)
	}
	// Only one host: the error stays pgx's.
	one := cfg.Copy()
	one.Fallbacks = nil
	if conn, err := pgconnect.Connect(ctx, one); err == nil {
		conn.Close(ctx)
		t.Fatal("connected to a server without the database")
	}
}
