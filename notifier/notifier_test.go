package notifier_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/internal/faultproxy"
	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/notifier"
)

func TestMain(m *testing.M) { pgtest.RunMain(m) }

// state is the durable state a handler reads: one integer in a table.
type state struct {
	mu    sync.Mutex
	seen  int
	calls int
	hints int
}

func (s *state) handler(ctx context.Context, conn *pgx.Conn, n *pgconn.Notification) error {
	var v int
	if err := conn.QueryRow(ctx, "select v from state").Scan(&v); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seen, s.calls = v, s.calls+1
	if n != nil {
		s.hints++
	}
	return nil
}

func (s *state) get() (seen, calls, hints int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seen, s.calls, s.hints
}

type env struct {
	t     *testing.T
	cc    *pgx.ConnConfig
	admin *pgx.Conn
}

func newEnv(t *testing.T) *env {
	cc, err := pgx.ParseConfig(pgtest.NewDB(t))
	if err != nil {
		t.Fatal(err)
	}
	admin, err := pgx.ConnectConfig(context.Background(), cc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Close(context.Background()) })
	e := &env{t: t, cc: cc, admin: admin}
	e.exec("create table state (v int); insert into state values (0)")
	return e
}

func (e *env) exec(sql string, args ...any) {
	e.t.Helper()
	if _, err := e.admin.Exec(context.Background(), sql, args...); err != nil {
		e.t.Fatal(err)
	}
}

// commit sets the durable state and notifies in one transaction, as the migrator does.
func (e *env) commit(v int) {
	e.exec(fmt.Sprintf("begin; update state set v = %d; select pg_notify('lanes_done', 'v%d'); commit", v, v))
}

// proxied returns a connection config that goes through a fault proxy to the test server.
func (e *env) proxied() (*pgx.ConnConfig, *faultproxy.Proxy) {
	p, err := faultproxy.New(pgtest.ProxyTarget(e.t, e.cc.ConnString()))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { p.Close() })
	cc := e.cc.Copy()
	cc.Host, cc.Port, cc.TLSConfig, cc.Fallbacks = "127.0.0.1", uint16(p.Addr().Port), nil, nil
	return cc, p
}

func (e *env) listener(cc *pgx.ConnConfig, s *state, cfg notifier.Config) *notifier.Listener {
	cfg.Channel = "lanes_done"
	// A short PingTimeout also bounds each connect attempt, which a loaded machine can exceed:
	// then a fresh listener (its counts and the handler's at zero) is started again, within a
	// hang guard.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for {
		l, err := notifier.New(cc, cfg, s.handler)
		if err != nil {
			e.t.Fatal(err)
		}
		err = l.Start(ctx)
		if err == nil {
			e.t.Cleanup(l.Stop)
			return l
		}
		l.Stop()
		if ctx.Err() != nil {
			e.t.Fatal(err)
		}
		s.mu.Lock()
		s.seen, s.calls, s.hints = 0, 0, 0 // what the failed start's handler saw does not count
		s.mu.Unlock()
		e.t.Logf("start the listener: %v; starting a new one", err)
		time.Sleep(100 * time.Millisecond)
	}
}

func TestNotificationTriggersARead(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := &state{}
	l := e.listener(e.cc, s, notifier.Config{})
	if _, calls, _ := s.get(); calls != 1 {
		t.Fatalf("Start should read the state once, read %d times", calls)
	}
	e.commit(1)
	testkit.Eventually(t, "state 1 seen", 5*time.Second, func() bool { v, _, _ := s.get(); return v == 1 })
	if _, _, hints := s.get(); hints != 1 || l.Delivery() != notifier.DeliveryListening {
		t.Fatalf("hints = %d, mode = %s", hints, l.Delivery())
	}
	// A rolled-back transaction notifies nobody.
	e.exec("begin; update state set v = 9; select pg_notify('lanes_done', 'v9'); rollback")
	e.commit(2)
	testkit.Eventually(t, "state 2 seen", 5*time.Second, func() bool { v, _, _ := s.get(); return v == 2 })
	if _, _, hints := s.get(); hints != 2 {
		t.Fatalf("hints = %d, want 2: the rolled-back notification must not arrive", hints)
	}
}

func TestReconnectAfterTerminateReadsWhatWasMissed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := &state{}
	cc := e.cc.Copy()
	cc.RuntimeParams = map[string]string{"application_name": "notifier_terminate_test"}
	l := e.listener(cc, s, notifier.Config{ReconnectMin: 300 * time.Millisecond, ReconnectMax: 300 * time.Millisecond})
	e.exec("select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'notifier_terminate_test' and datname = current_database()")
	// Committed while the listener is disconnected: the notification is lost, the state is not.
	e.commit(1)
	testkit.Eventually(t, "state 1 seen after the reconnect", 10*time.Second, func() bool { v, _, _ := s.get(); return v == 1 })
	if st := l.Stats(); st.Connects < 2 {
		t.Fatalf("connects = %d, want a reconnect", st.Connects)
	}
	testkit.Eventually(t, "listening again", 5*time.Second, func() bool { return l.Delivery() == notifier.DeliveryListening })
	e.commit(2)
	testkit.Eventually(t, "state 2 seen by notification", 5*time.Second, func() bool { v, _, _ := s.get(); return v == 2 })
}

func TestHalfOpenConnectionIsDetectedByPing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := &state{}
	cc, proxy := e.proxied()
	l := e.listener(cc, s, notifier.Config{PingInterval: 200 * time.Millisecond, PingTimeout: 300 * time.Millisecond,
		ReconnectMin: 50 * time.Millisecond, ReconnectMax: 200 * time.Millisecond})
	proxy.SetBlackhole(true) // packets vanish; no FIN, no RST
	e.commit(1)              // the notification is stuck in the black hole
	testkit.Eventually(t, "the listener gives up on the half-open connection", time.Minute, func() bool {
		return l.Delivery() != notifier.DeliveryListening
	})
	if v, _, _ := s.get(); v != 0 {
		t.Fatal("state seen through a black hole")
	}
	if l.Delivery() == notifier.DeliveryListening {
		t.Fatal("listener still believes a half-open connection is listening")
	}
	proxy.SetBlackhole(false)
	testkit.Eventually(t, "state 1 seen after the partition heals", time.Minute, func() bool { v, _, _ := s.get(); return v == 1 })
	if st := l.Stats(); st.Connects < 2 {
		t.Fatalf("connects = %d, want a new connection", st.Connects)
	}
}

func TestDeafListenFallsBackToPollingAndLogsOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := &state{}
	cc, proxy := e.proxied()
	proxy.SetDeaf(true) // LISTEN is accepted, notifications never arrive: a pooler in transaction mode
	var logs logbuf.Buffer
	l := e.listener(cc, s, notifier.Config{PollInterval: 50 * time.Millisecond, RelistenInterval: 300 * time.Millisecond,
		ProbeTimeout: 200 * time.Millisecond, ReconnectMin: 10 * time.Millisecond, ReconnectMax: 20 * time.Millisecond,
		Logger: zerolog.New(&logs)})
	if l.Delivery() != notifier.DeliveryPolling {
		t.Fatalf("mode = %s, want polling", l.Delivery())
	}
	e.commit(1)
	testkit.Eventually(t, "state 1 seen by polling", 5*time.Second, func() bool { v, _, _ := s.get(); return v == 1 })
	time.Sleep(time.Second) // several relisten attempts, all deaf
	if n := strings.Count(logs.String(), "polling instead"); n != 1 {
		t.Fatalf("fallback logged %d times, want once:\n%s", n, logs.String())
	}
	if st := l.Stats(); st.Polls == 0 {
		t.Fatalf("stats = %+v", st)
	}
	proxy.SetDeaf(false)
	testkit.Eventually(t, "listening again", 5*time.Second, func() bool { return l.Delivery() == notifier.DeliveryListening })
	if !strings.Contains(logs.String(), "LISTEN works again") {
		t.Fatalf("recovery not logged:\n%s", logs.String())
	}
	polls := l.Stats().Polls
	e.commit(2)
	testkit.Eventually(t, "state 2 seen by notification", 5*time.Second, func() bool { v, _, _ := s.get(); return v == 2 })
	time.Sleep(200 * time.Millisecond)
	if got := l.Stats().Polls; got != polls {
		t.Fatalf("still polling while listening: %d polls, then %d", polls, got)
	}
}

func TestStartFailsFastAndStopIsIdempotent(t *testing.T) {
	t.Parallel()
	cc, err := pgx.ParseConfig("postgres://u:s3cr3t@127.0.0.1:1/db?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	l, err := notifier.New(cc, notifier.Config{Channel: "lanes_done", PingTimeout: time.Second},
		func(context.Context, *pgx.Conn, *pgconn.Notification) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	err = l.Start(context.Background())
	if err == nil || strings.Contains(err.Error(), "s3cr3t") {
		t.Fatalf("Start = %v", err)
	}
	l.Stop()
	l.Stop()
	if _, err := notifier.New(cc, notifier.Config{Channel: strings.Repeat("x", 64)}, func(context.Context, *pgx.Conn, *pgconn.Notification) error { return nil }); err == nil {
		t.Fatal("accepted a 64-byte channel")
	}
}

// Stop while Start is still in its first handler call: Stop cancels that call and waits for
// Start, so once Stop returns the connection is closed, Start has returned an error and the mode
// is stopped, never a stale "listening" set by the connect that Stop interrupted. The package's
// leak check (TestMain) proves no goroutine stays behind.
func TestStopDuringStartLeavesNothingRunning(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	inHandler := make(chan *pgx.Conn, 1)
	release := make(chan struct{})
	defer close(release)
	l, err := notifier.New(e.cc, notifier.Config{Channel: "lanes_done"}, func(ctx context.Context, conn *pgx.Conn, n *pgconn.Notification) error {
		select {
		case inHandler <- conn:
		default:
		}
		select { // a handler that honours its context, or a release that never comes in time
		case <-ctx.Done():
			return ctx.Err()
		case <-release:
			return nil
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	startErr := make(chan error, 1)
	go func() { startErr <- l.Start(context.Background()) }()
	var conn *pgx.Conn
	select {
	case conn = <-inHandler:
	case <-time.After(20 * time.Second):
		t.Fatal("Start never called the handler")
	}
	stopped := make(chan struct{})
	go func() {
		l.Stop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("Stop did not return while Start was in its handler")
	}
	// Stop has waited for Start's work (the connection is closed, the delivery is stopped, see
	// below); Start's own return is then only the goroutine's send, so it is awaited, bounded.
	if !conn.IsClosed() {
		t.Error("the connection Start opened is still open when Stop returns")
	}
	select {
	case err := <-startErr:
		if err == nil {
			t.Fatal("Start returned nil although Stop ran during it")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Start did not return after Stop")
	}
	if !conn.IsClosed() {
		t.Error("the connection Start opened is still open after Stop")
	}
	if m := l.Delivery(); m != notifier.DeliveryStopped {
		t.Errorf("mode after Stop during Start = %s, want %s", m, notifier.DeliveryStopped)
	}
	if err := l.Start(context.Background()); err == nil {
		t.Error("Start after Stop succeeded")
	}
}

// Deferred runs after each notification's handler call, and again, without any notification,
// once the time it asked for comes: work a handler put off is never left pending.
func TestDeferredRunsWhenItAsks(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	s := &state{}
	calls := make(chan time.Time, 10)
	var asked time.Time
	cfg := notifier.Config{PingInterval: time.Hour, Deferred: func(ctx context.Context, conn *pgx.Conn) (time.Time, error) {
		var v int
		if err := conn.QueryRow(ctx, "select v from state").Scan(&v); err != nil {
			return time.Time{}, err
		}
		calls <- time.Now()
		if asked.IsZero() {
			asked = time.Now().Add(100 * time.Millisecond)
			return asked, nil
		}
		return time.Time{}, nil
	}}
	e.listener(e.cc, s, cfg)
	e.commit(1)
	for i := range 2 {
		select {
		case at := <-calls:
			if i == 1 && at.Before(asked) {
				t.Fatalf("Deferred ran again at %s, before the time it asked for (%s)", at, asked)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("Deferred call %d never came", i+1)
		}
	}
	if _, _, hints := s.get(); hints != 1 {
		t.Fatalf("hints = %d, want 1: the second Deferred call came without a notification", hints)
	}
}

// CheckSoon runs the check at once, without reconnecting, although PingInterval is an hour; and
// CheckInterval's answer paces the checks that follow.
func TestCheckSoonAndCheckInterval(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var s state
	var mu sync.Mutex
	checks := 0
	often := false
	l, err := notifier.New(e.cc, notifier.Config{Channel: "ch", PingInterval: time.Hour,
		Check: func(ctx context.Context, conn *pgx.Conn) error {
			mu.Lock()
			checks++
			mu.Unlock()
			return conn.Ping(ctx)
		},
		CheckInterval: func() time.Duration {
			mu.Lock()
			defer mu.Unlock()
			if often {
				return 20 * time.Millisecond
			}
			return 0 // PingInterval
		},
	}, s.handler)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer l.Stop()
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return checks
	}
	l.CheckSoon()
	testkit.Eventually(t, "the check runs after CheckSoon", time.Minute, func() bool { return count() == 1 })
	mu.Lock()
	often = true
	mu.Unlock()
	l.CheckSoon()
	testkit.Eventually(t, "checks follow every CheckInterval", time.Minute, func() bool { return count() >= 10 })
	if n := l.Stats().Connects; n != 1 {
		t.Errorf("%d connects, want 1: a CheckSoon must not cost the connection", n)
	}
}
