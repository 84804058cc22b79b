package app

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

// TestPageReadsAreSharedByStreams: five open /events streams cost one database read per
// notification together, not one each, and each stream gets the new state.
func TestPageReadsAreSharedByStreams(t *testing.T) {
	t.Parallel()
	cc, err := pgx.ParseConfig(pgtest.NewDB(t))
	if err != nil {
		t.Fatal(err)
	}
	// The slow lane's migration runs until the end, so the listener stays connected throughout
	// (a replica whose lanes are all done closes it, and opens it again for a stream).
	started := make(chan struct{}, 1)
	slow := migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{{Version: 1, Name: "forever",
		Up: func(ctx context.Context, _ pgx.Tx) error {
			select {
			case started <- struct{}{}:
			default:
			}
			<-ctx.Done()
			return ctx.Err()
		}}}}
	m, err := migrator.New(cc, []migrator.Lane{{Name: "fast", FS: fstest.MapFS{"001_a.sql": testkit.File("select 1;")}}, slow}, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := New(m, Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-started:
	case <-ctx.Done():
		t.Fatal("the slow lane never started")
	}
	srv := httptest.NewServer(r.Handler())
	defer srv.Close()

	const streams = 5
	events := make([]chan string, streams)
	for i := range events {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/events", nil)
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		ch := make(chan string, 10)
		events[i] = ch
		go func() {
			defer close(ch)
			sc := bufio.NewScanner(resp.Body)
			sc.Buffer(make([]byte, 1<<20), 1<<20)
			for sc.Scan() {
				if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
					ch <- data
				}
			}
		}()
	}
	next := func(i int) string {
		t.Helper()
		select {
		case d, ok := <-events[i]:
			if !ok {
				t.Fatalf("stream %d ended", i)
			}
			return d
		case <-time.After(2 * time.Minute):
			t.Fatalf("stream %d: no event", i)
			return ""
		}
	}
	for i := range events {
		next(i)
	}
	before, heard := r.events.reads.Load(), r.View().Notifications
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	payload := wire.Event{Lane: "fast", Version: 1, State: wire.Done}.Payload()
	if _, err := conn.Exec(ctx, "select pg_notify($1, $2)", m.Channel(), payload); err != nil {
		t.Fatal(err)
	}
	// Each stream's next events until one shows the notification (an event of a read made
	// before it may come first: a read that began before the count above).
	for i := range events {
		for {
			d := next(i)
			var msg struct {
				State struct {
					Replica struct {
						Notifications int `json:"notifications"`
					} `json:"replica"`
				} `json:"state"`
			}
			if err := json.Unmarshal([]byte(d), &msg); err != nil {
				t.Fatalf("stream %d: %v: %s", i, err, d)
			}
			if msg.State.Replica.Notifications > heard {
				if !strings.Contains(d, `"last_notification":{`) {
					t.Fatalf("stream %d: the event after the notification: %s", i, d)
				}
				break
			}
		}
	}
	if n := r.events.reads.Load() - before; n < 1 || n > 2 {
		t.Fatalf("%d page reads for one notification and %d streams, want 1 (2 if a state change followed it)", n, streams)
	}
	cancel()
}
