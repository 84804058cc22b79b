package notifier_test

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/notifier"
)

// A listener whose handler re-reads durable state after every (re)connect and notification.
func ExampleListener() {
	ctx := context.Background()
	cc, err := pgx.ParseConfig(pgtest.ExampleDB())
	if err != nil {
		panic(err)
	}
	admin, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		panic(err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "create table flag (done bool); insert into flag values (false)"); err != nil {
		panic(err)
	}

	done := make(chan struct{})
	var closed bool
	l, err := notifier.New(cc, notifier.Config{Channel: "lanes_done"}, func(ctx context.Context, conn *pgx.Conn, n *pgconn.Notification) error {
		var isDone bool // the payload is only a hint: read the state
		if err := conn.QueryRow(ctx, "select done from flag").Scan(&isDone); err != nil {
			return err
		}
		if isDone && !closed {
			closed = true // the handler runs on the listener's one goroutine
			close(done)
		}
		return nil
	})
	if err != nil {
		panic(err)
	}
	if err := l.Start(ctx); err != nil { // connects, LISTENs, then reads once
		panic(err)
	}
	defer l.Stop()
	fmt.Println("mode:", l.Delivery())

	if _, err := admin.Exec(ctx, "begin; update flag set done = true; notify lanes_done; commit"); err != nil {
		panic(err)
	}
	select {
	case <-done:
		fmt.Println("done")
	case <-time.After(10 * time.Second):
		fmt.Println("timed out")
	}
	// Output:
	// mode: listening
	// done
}
