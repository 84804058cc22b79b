package app_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// walk is a batched backfill over the table items whose batches can be held: batch n waits in
// its transaction, before it commits, while hold[n] is open.
type walk struct {
	calls   atomic.Int32
	reached chan int32              // each held batch's number, once it waits
	hold    map[int32]chan struct{} // closed by the test to let that batch commit
}

func newWalk(held ...int32) *walk {
	w := &walk{reached: make(chan int32, len(held)), hold: map[int32]chan struct{}{}}
	for _, n := range held {
		w.hold[n] = make(chan struct{})
	}
	return w
}

func (w *walk) batch(ctx context.Context, tx pgx.Tx, lo, hi int64) error {
	n := w.calls.Add(1)
	if _, err := tx.Exec(ctx, "update items set n = n + 1 where id > $1 and id <= $2", lo, hi); err != nil {
		return err
	}
	if ch, ok := w.hold[n]; ok {
		w.reached <- n
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// lane is a background lane "backfill" running the walk in batches of 10 keys.
func (w *walk) lane() migrator.Lane {
	return migrator.Lane{Name: "backfill", Mode: migrator.Background, Funcs: []migrator.GoMigration{
		{Version: 1, Name: "visit_items", Backfill: &migrator.Backfill{Table: "items", Key: "id", Size: 10, Range: w.batch}}}}
}

// waitReached waits until batch n of the walk holds.
func (w *walk) waitReached(t *testing.T, n int32) {
	t.Helper()
	select {
	case got := <-w.reached:
		if got != n {
			t.Fatalf("batch %d held, want %d", got, n)
		}
	case <-time.After(2 * time.Minute):
		t.Fatalf("batch %d never ran", n)
	}
}

// badLane fails permanently on line 2 of its file, with a password in the failing statement.
var badLane = migrator.Lane{Name: "bad", Mode: migrator.Background, FS: fstest.MapFS{
	"001_broken.sql": testkit.File("select 1;\nselect 'hunter2'::int;\n"),
}}

// pageEnv is a database with 300 analyzed rows in items.
func pageEnv(t *testing.T) *env {
	e := newEnv(t)
	e.exec("create table items (id int8 primary key, n int not null default 0); insert into items (id) select generate_series(1, 300); analyze items")
	return e
}

// TestPageRendersTheStateWithoutJavaScript: GET / shows, in HTML alone, every lane with its
// state and version, the running backfill's progress bar, rate and ETA, the session holding
// its lock, the last failure with its file, line and SQLSTATE and the statement's literals
// masked, the history rows with durations, and this replica's listener view.
func TestPageRendersTheStateWithoutJavaScript(t *testing.T) {
	t.Parallel()
	e := pageEnv(t)
	w := newWalk(2)
	r := e.replica(fastLane, w.lane(), badLane)
	w.waitReached(t, 2) // batch 1 committed; batch 2 holds the lock
	h := r.Handler()
	srv := httptest.NewServer(h)
	defer srv.Close()
	var body string
	get := func() {
		t.Helper()
		resp, err := srv.Client().Get(srv.URL + "/")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
		if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
			t.Fatalf("GET /: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") {
			t.Errorf("Content-Security-Policy %q", csp)
		}
	}
	section := func(lane string) string {
		t.Helper()
		_, s, ok := strings.Cut(body, `<section class="lane" id="lane-`+lane+`"`)
		if !ok {
			t.Fatalf("no section for lane %s in\n%s", lane, body)
		}
		s, _, _ = strings.Cut(s, "</section>")
		return s
	}
	// The page reads the database: the batch's progress committed with it. This replica's
	// view shows the batch's announcement once its listener has received it.
	testkit.Eventually(t, "the announcement received", 2*time.Minute, func() bool {
		get()
		return strings.Contains(body, `class="last-notification">progress of <code>backfill</code> version 1`)
	})
	fast, bf := section("fast"), section("backfill")
	for _, want := range []string{`data-state="done"`, "2 / 2", "001_create.sql", "002_seed.sql", "applied", "free"} {
		if !strings.Contains(fast, want) {
			t.Errorf("fast lane section lacks %q:\n%s", want, fast)
		}
	}
	for _, want := range []string{`data-state="running"`, "0 / 1", "001_visit_items.go", `<progress max="100" value="3.3">`,
		`data-done="10"`, `data-total="300"`, "/s · ETA ", "held by <code>lanes/", "backend pid ", "connected 20"} {
		if !strings.Contains(bf, want) {
			t.Errorf("backfill lane section lacks %q:\n%s", want, bf)
		}
	}
	for _, want := range []string{`class="delivery">listening<`, "received"} {
		if !strings.Contains(body, want) {
			t.Errorf("replica section lacks %q:\n%s", want, body)
		}
	}
	for _, asset := range []string{"/page.js", "/page.css"} {
		if code, b := httpGet(t, h, asset); code != http.StatusOK || len(b) < 100 {
			t.Errorf("GET %s: %d, %d bytes", asset, code, len(b))
		}
	}

	// The backfill finishes; then the bad lane (after it in order) fails.
	close(w.hold[2])
	testkit.Eventually(t, "the bad lane's failure on the page", 2*time.Minute, func() bool {
		get()
		return strings.Contains(section("bad"), `data-state="failed"`)
	})
	bad := section("bad")
	if bf := section("backfill"); !strings.Contains(bf, `data-state="done"`) || !strings.Contains(bf, "001_visit_items.go") || strings.Contains(bf, "<progress") {
		t.Errorf("backfill lane section once done:\n%s", bf)
	}
	for _, want := range []string{`data-state="failed"`, "<code>001_broken.sql</code> line 2", "SQLSTATE <code>22P02</code>", "permanent", "select &#39;***&#39;::int"} {
		if !strings.Contains(bad, want) {
			t.Errorf("bad lane section lacks %q:\n%s", want, bad)
		}
	}
	if strings.Contains(body, "hunter2") {
		t.Errorf("the page shows a string literal of a failed statement:\n%s", body)
	}
	if !strings.Contains(bad, `invalid input syntax for type integer: &#34;***&#34;`) {
		t.Errorf("the failure's message is not shown, masked:\n%s", bad)
	}
	if code, lanes := httpGet(t, h, "/lanes"); code != http.StatusOK || strings.Contains(lanes, "hunter2") {
		t.Errorf("/lanes shows the value a failed statement quoted: %d %s", code, lanes)
	}
}

// sseEvent is one Server-Sent Event.
type sseEvent struct {
	name string
	data string
}

// readEvents sends the stream's events to the returned channel until the body ends.
func readEvents(body io.Reader) <-chan sseEvent {
	out := make(chan sseEvent, 100)
	go func() {
		defer close(out)
		sc := bufio.NewScanner(body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		var ev sseEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if ev.name != "" {
					out <- ev
				}
				ev = sseEvent{}
			case strings.HasPrefix(line, "event: "):
				ev.name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				ev.data += strings.TrimPrefix(line, "data: ")
			}
		}
	}()
	return out
}

// eventState is the part of an /events message's data the tests read.
type eventState struct {
	HTML  string `json:"html"`
	State struct {
		Lanes []struct {
			Name     string             `json:"name"`
			State    migrator.State     `json:"state"`
			Version  int32              `json:"version"`
			Progress *migrator.Progress `json:"progress"`
		} `json:"lanes"`
		Replica app.ReplicaView `json:"replica"`
	} `json:"state"`
}

// nextState returns the next "state" event's data, failing after a hang guard.
func nextState(t *testing.T, events <-chan sseEvent) eventState {
	t.Helper()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatal("the event stream ended")
			}
			if ev.name != "state" {
				continue
			}
			var s eventState
			if err := json.Unmarshal([]byte(ev.data), &s); err != nil {
				t.Fatalf("event data: %v: %s", err, ev.data)
			}
			return s
		case <-time.After(2 * time.Minute):
			t.Fatal("no event")
		}
	}
}

// TestEventsStreamFollowsNotifications: /events sends the state at once, then a new state after
// the replica's listener hears of a committed batch and of the lane's completion, with no
// request from the client in between; the stream ends when the client goes, and at StopEvents
// (later streams get 204). goleak (TestMain) checks that no handler is left behind.
func TestEventsStreamFollowsNotifications(t *testing.T) {
	t.Parallel()
	e := pageEnv(t)
	w := newWalk(1)
	r := e.replica(fastLane, w.lane())
	w.waitReached(t, 1)
	srv := httptest.NewServer(r.Handler())
	defer srv.Close()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/events", nil)
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("GET /events: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	events := readEvents(resp.Body)
	first := nextState(t, events)
	if l := first.State.Lanes[1]; l.Name != "backfill" || l.State != migrator.StateRunning || l.Progress == nil || l.Progress.Done != 0 {
		t.Fatalf("first event: %+v", first.State.Lanes)
	}
	if !strings.Contains(first.HTML, `data-lane="backfill"`) {
		t.Fatalf("first event's html: %s", first.HTML)
	}
	before := first.State.Replica.Notifications
	close(w.hold[1]) // batch 1 commits and announces its progress; the rest follow
	var last eventState
	for {
		last = nextState(t, events)
		if last.State.Lanes[1].State == migrator.StateDone {
			break
		}
	}
	if l := last.State.Lanes[1]; l.Version != 1 || l.Progress != nil || !strings.Contains(last.HTML, `data-state="done"`) {
		t.Fatalf("last event: %+v\n%s", l, last.HTML)
	}
	if n := last.State.Replica.LastNotification; n == nil || n.Lane != "backfill" || last.State.Replica.Notifications <= before {
		t.Fatalf("last notification: %+v", n)
	}

	// The client goes: its handler ends (goleak), the server's Close does not wait for it.
	cancel()
	for range events {
	}

	// StopEvents ends an open stream and refuses the next with 204.
	resp2, err := srv.Client().Get(srv.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp2.Body.Close()
	events2 := readEvents(resp2.Body)
	nextState(t, events2)
	r.StopEvents()
	for range events2 {
	}
	resp3, err := srv.Client().Get(srv.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	resp3.Body.Close()
	if resp3.StatusCode != http.StatusNoContent {
		t.Fatalf("GET /events after StopEvents: %d", resp3.StatusCode)
	}
}

// TestEventsEndAtShutdownAndClose: an http.Server with StopEvents registered shuts down while a
// stream is open, and a stream open when the Runtime closes ends.
func TestEventsEndAtShutdownAndClose(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, how := range []string{"shutdown", "close"} {
		r := e.replica(fastLane)
		srv := httptest.NewUnstartedServer(r.Handler())
		srv.Config.RegisterOnShutdown(r.StopEvents)
		srv.Start()
		resp, err := srv.Client().Get(srv.URL + "/events")
		if err != nil {
			t.Fatal(err)
		}
		events := readEvents(resp.Body)
		nextState(t, events)
		switch how {
		case "shutdown":
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			if err := srv.Config.Shutdown(ctx); err != nil {
				t.Fatalf("shutdown with an open stream: %v", err)
			}
			cancel()
		case "close":
			if err := r.Close(); err != nil {
				t.Fatal(err)
			}
		}
		for range events {
		}
		resp.Body.Close()
		srv.Close()
		if err := r.Close(); err != nil && !errors.Is(err, app.ErrClosed) {
			t.Fatal(err)
		}
	}
}

// TestEventsOutliveTheServersWriteTimeout: a stream on a server with a WriteTimeout (1 ms
// here: shorter than any page read) still delivers the state after a notification.
func TestEventsOutliveTheServersWriteTimeout(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	r := e.replica(fastLane, slowLane(g))
	waitStarted(t, g) // a lane not done: the listener stays connected throughout
	srv := httptest.NewUnstartedServer(r.Handler())
	srv.Config.WriteTimeout = time.Millisecond
	srv.Start()
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	events := readEvents(resp.Body)
	first := nextState(t, events)
	conn, err := pgx.ConnectConfig(t.Context(), e.cc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(t.Context(), `select pg_notify('lanes_done', '{"lane":"fast","version":2,"state":"done"}')`); err != nil {
		t.Fatal(err)
	}
	if s := nextState(t, events); s.State.Replica.Notifications <= first.State.Replica.Notifications {
		t.Fatalf("the state after a notification: %+v", s.State.Replica)
	}
	r.StopEvents()
}

// A service mounts the replica's endpoints, the live page included, on its own server; the
// page's links are relative, so it works under a prefix that keeps its trailing slash.
func ExampleRuntime_Handler() {
	cc, err := pgx.ParseConfig(pgtest.ExampleDB())
	if err != nil {
		panic(err)
	}
	fast := migrator.Lane{Name: "fast", FS: fstest.MapFS{"001_create.sql": {Data: []byte("create table notes (id int);")}}}
	m, err := migrator.New(cc, []migrator.Lane{fast}, migrator.Config{})
	if err != nil {
		panic(err)
	}
	r, err := app.New(m, app.Config{})
	if err != nil {
		panic(err)
	}
	defer r.Close()
	if err := r.Start(context.Background()); err != nil {
		panic(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/lanes/", http.StripPrefix("/lanes", r.Handler())) // the page at /lanes/
	srv := httptest.NewUnstartedServer(mux)
	srv.Config.RegisterOnShutdown(r.StopEvents) // Shutdown would wait for open /lanes/events streams
	srv.Start()
	defer srv.Close()

	resp, err := http.Get(srv.URL + "/lanes/")
	if err != nil {
		panic(err)
	}
	defer resp.Body.Close()
	page, err := io.ReadAll(resp.Body)
	if err != nil {
		panic(err)
	}
	fmt.Println(resp.Header.Get("Content-Type"))
	fmt.Println(strings.Contains(string(page), `data-lane="fast" data-state="done"`))
	// Output:
	// text/html; charset=utf-8
	// true
}
