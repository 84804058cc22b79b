package app_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"os"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/faultproxy"
	"github.com/multilanes/lanes/internal/logbuf"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

func TestMain(m *testing.M) { pgtest.RunMain(m) }

var fastLane = migrator.Lane{Name: "fast", FS: fstest.MapFS{
	"001_create.sql": testkit.File("create table example (i int);"),
	"002_seed.sql":   testkit.File("insert into example values (1);"),
}}

// gate is a slow Go migration that waits until released, counting its runs.
type gate struct {
	runs    atomic.Int32
	started chan struct{}
	release chan struct{}
}

func newGate() *gate { return &gate{started: make(chan struct{}, 100), release: make(chan struct{})} }

func (g *gate) up(ctx context.Context, conn pgx.Tx) error {
	g.runs.Add(1)
	g.started <- struct{}{}
	select {
	case <-g.release:
	case <-ctx.Done():
		return ctx.Err()
	}
	_, err := conn.Exec(ctx, "insert into example values (2)")
	return err
}

func slowLane(g *gate) migrator.Lane {
	return migrator.Lane{Name: "slow", Mode: migrator.Background,
		FS:    fstest.MapFS{"002_after.sql": testkit.File("insert into example values (3);")},
		Funcs: []migrator.GoMigration{{Version: 1, Name: "load", Up: g.up}}}
}

type env struct {
	t   *testing.T
	url string
	cc  *pgx.ConnConfig
}

func newEnv(t *testing.T) *env {
	url := pgtest.NewDB(t)
	cc, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, url: url, cc: cc}
}

// replica returns a started Runtime, closed at cleanup.
func (e *env) replica(lanes ...migrator.Lane) *app.Runtime {
	r := e.runtime(lanes...)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := r.Start(ctx); err != nil {
		e.t.Fatal(err)
	}
	return r
}

func (e *env) runtime(lanes ...migrator.Lane) *app.Runtime {
	return e.runtimeWith(nil, lanes...)
}

// runtimeWith returns a Runtime with the tests' short intervals (takeover 100ms, retries
// 20-200ms, listener check every second), changed by tune when it is not nil.
func (e *env) runtimeWith(tune func(*app.Config), lanes ...migrator.Lane) *app.Runtime {
	m, err := migrator.New(e.cc, lanes, migrator.Config{LockPollInterval: 20 * time.Millisecond})
	if err != nil {
		e.t.Fatal(err)
	}
	cfg := app.Config{Logger: zerolog.New(os.Stderr).Level(zerolog.DebugLevel), TakeoverInterval: 100 * time.Millisecond, RetryMin: 20 * time.Millisecond, RetryMax: 200 * time.Millisecond,
		Notifier: notifier.Config{PingInterval: time.Second}}
	if tune != nil {
		tune(&cfg)
	}
	r, err := app.New(m, cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { r.Close() })
	return r
}

// proxied returns a copy of the test's connection config that goes through a fault proxy,
// closed at the end of the test.
func (e *env) proxied() (*pgx.ConnConfig, *faultproxy.Proxy) {
	proxy, err := faultproxy.New(pgtest.ProxyTarget(e.t, e.url))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { proxy.Close() })
	cc := e.cc.Copy()
	cc.Host, cc.Port, cc.TLSConfig, cc.Fallbacks = "127.0.0.1", uint16(proxy.Addr().Port), nil, nil
	return cc, proxy
}

func (e *env) exec(sql string, args ...any) {
	e.t.Helper()
	conn, err := pgx.ConnectConfig(context.Background(), e.cc)
	if err != nil {
		e.t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(context.Background(), sql, args...); err != nil {
		e.t.Fatal(err)
	}
}

func waitDone(t *testing.T, r *app.Runtime, lane string) {
	t.Helper()
	done, err := r.Done(lane)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("lane %s never done (version %d)", lane, r.Version(lane))
	}
}

func waitStarted(t *testing.T, g *gate) {
	t.Helper()
	select {
	case <-g.started:
	case <-time.After(20 * time.Second):
		t.Fatal("slow migration never started")
	}
}

func TestReplicasLearnOfCompletionThroughListen(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	var rs []*app.Runtime
	for range 3 {
		// Takeover and listener-check intervals longer than the test: a waiting replica can learn
		// that the lane is done only through a notification (a lock check that happens to run
		// between the applier's commit and its unlock would otherwise read the new version first).
		r := e.runtimeWith(func(c *app.Config) {
			c.TakeoverInterval = time.Hour
			c.Notifier.PingInterval = time.Hour
		}, fastLane, slowLane(g))
		if err := r.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		rs = append(rs, r)
	}
	waitStarted(t, g)
	// Let every replica make its first attempt at the slow lane so that the two that lose are
	// waiting when the lane ends; a replica that first looked after the end would learn it from
	// that read ("check") and prove nothing about the signal.
	testkit.Eventually(t, "two replicas waiting for the one applying", 10*time.Second, func() bool {
		roles := map[string]int{}
		for _, r := range rs {
			roles[r.View().Lanes[1].Role]++
		}
		return roles["waiting"] == 2 && roles["applying"] == 1
	})
	for i, r := range rs {
		if !r.Ready() || !r.IsDone("fast") || r.IsDone("slow") {
			t.Fatalf("replica %d: ready=%v fast=%v slow=%v", i, r.Ready(), r.IsDone("fast"), r.IsDone("slow"))
		}
	}
	close(g.release)
	for _, r := range rs {
		waitDone(t, r, "slow")
	}
	if n := g.runs.Load(); n != 1 {
		t.Fatalf("slow migration ran %d times", n)
	}
	via := map[string]int{}
	for _, r := range rs {
		via[r.View().Lanes[1].Via]++
	}
	// The two replicas that did not apply the lane learned it by notification; the one that did
	// knows it either from its own commit or from its own notification, whichever came first.
	if via["notification"] < 2 || via["applied"]+via["notification"] != 3 {
		t.Fatalf("how replicas learned the slow lane was done: %v; want 2 or 3 by notification, the rest applied", via)
	}
	for i, r := range rs {
		// The applier knows the lane is done from its own commit, before its listener has
		// necessarily read the notification that commit sent: wait for it, bounded.
		testkit.Eventually(t, fmt.Sprintf("replica %d receives a notification", i), 10*time.Second, func() bool {
			return r.View().Notifications > 0
		})
		s := r.View()
		// Listening, or idle: with every lane done the listener's connection is closed.
		if mode := r.View().Listener; s.Polls != 0 || mode != notifier.DeliveryListening && mode != app.DeliveryIdle {
			t.Fatalf("replica %d polled: %+v mode %s", i, s, r.View().Listener)
		}
	}
}

func TestReplicaStartingDuringSlowMigrationIsReadyAtOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	first := e.replica(fastLane, slowLane(g))
	waitStarted(t, g) // the first replica now holds the slow lane's lock inside its migration
	// A new replica becomes ready while the slow migration still runs: Start does not wait for
	// the slow lane's lock (the gate is still closed, so waiting would hang until the timeout).
	late := e.replica(fastLane, slowLane(g))
	if !late.Ready() || late.IsDone("slow") {
		t.Fatalf("late replica: ready=%v slow done=%v", late.Ready(), late.IsDone("slow"))
	}
	st, err := late.Status(context.Background())
	if err != nil || st.Lanes[1].State != migrator.StateRunning {
		t.Fatalf("status = %+v, %v", st, err)
	}
	close(g.release)
	waitDone(t, late, "slow")
	waitDone(t, first, "slow")
}

func TestWaitVersionOpensAFeatureBeforeTheLaneEnds(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	block := make(chan struct{})
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, Funcs: []migrator.GoMigration{
		{Version: 1, Name: "one", Up: func(ctx context.Context, c pgx.Tx) error { return nil }},
		{Version: 2, Name: "two", Up: func(ctx context.Context, c pgx.Tx) error {
			select {
			case <-block:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}},
	}}
	applier := e.replica(fastLane, lane)
	watcher := e.replica(fastLane, lane)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, r := range []*app.Runtime{applier, watcher} {
		if err := r.WaitVersion(ctx, "slow", 1); err != nil {
			t.Fatal(err)
		}
		if r.IsDone("slow") {
			t.Fatal("lane done before its last migration")
		}
	}
	short, cancelShort := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort()
	if err := watcher.Wait(short, "slow"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait = %v, want deadline exceeded", err)
	}
	close(block)
	for _, r := range []*app.Runtime{applier, watcher} {
		if err := r.Wait(ctx, "slow"); err != nil {
			t.Fatal(err)
		}
	}
}

func TestSpoofedNotificationsNeverMakeALaneDone(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	applier := e.replica(fastLane, slowLane(g))
	waitStarted(t, g)
	watcher := e.replica(fastLane, slowLane(g))
	before := watcher.View().Notifications
	for _, payload := range []string{
		`{"lane":"slow","version":99,"done":true}`,
		`{"lane":"slow","version":2,"done":true}`,
		`not json`,
		`{"lane":"../../etc","version":1}`,
		strings.Repeat("x", 7999),
	} {
		e.exec("select pg_notify('lanes_done', $1)", payload)
	}
	deadline := time.Now().Add(10 * time.Second)
	for watcher.View().Notifications < before+5 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := watcher.View().Notifications; got < before+5 {
		t.Fatalf("watcher received %d of 5 spoofed notifications", got-before)
	}
	if watcher.IsDone("slow") || applier.IsDone("slow") {
		t.Fatal("a spoofed notification made the lane look done")
	}
	close(g.release)
	waitDone(t, watcher, "slow")
}

func TestPermanentFailureIsReportedAndNotRetried(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	bad := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{
		"001_ok.sql":  testkit.File("create table ok (i int);"),
		"002_bad.sql": testkit.File("select * from no_such_table;"),
	}}
	var rs []*app.Runtime
	for range 3 {
		rs = append(rs, e.replica(fastLane, bad))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i, r := range rs {
		err := r.Wait(ctx, "slow")
		var fe *app.FailedError
		if !errors.As(err, &fe) || fe.Failure.File != "002_bad.sql" || !strings.Contains(err.Error(), "no_such_table") {
			t.Fatalf("replica %d: Wait = %v", i, err)
		}
		if !r.Ready() || r.Version("slow") != 1 {
			t.Fatalf("replica %d: ready=%v version=%d", i, r.Ready(), r.Version("slow"))
		}
	}
	// Give the replicas several takeover intervals to (wrongly) retry.
	time.Sleep(500 * time.Millisecond)
	conn, err := pgx.ConnectConfig(ctx, e.cc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var failures int
	if err := conn.QueryRow(ctx, "select count(*) from lanes_history where lane = 'slow' and error is not null").Scan(&failures); err != nil {
		t.Fatal(err)
	}
	if failures != 1 {
		t.Fatalf("failed migration attempted %d times, want 1", failures)
	}
	// A deploy with the fixed file continues from version 1.
	fixed := bad
	fixed.FS = fstest.MapFS{"001_ok.sql": bad.FS.(fstest.MapFS)["001_ok.sql"], "002_bad.sql": testkit.File("select 1;")}
	r := e.replica(fastLane, fixed)
	waitDone(t, r, "slow")
	for _, old := range rs {
		waitDone(t, old, "slow")
	}
}

func TestTakeoverWhenTheApplyingSessionDies(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	a := e.replica(fastLane, slowLane(g))
	waitStarted(t, g)
	b := e.replica(fastLane, slowLane(g))
	// Kill the session applying the slow lane, as a crash or a killed pod would.
	e.exec(`select pg_terminate_backend(l.pid) from pg_locks l
where l.locktype = 'advisory' and l.granted and l.pid <> pg_backend_pid() and l.database = (select oid from pg_database where datname = current_database())`)
	close(g.release)
	waitDone(t, b, "slow")
	waitDone(t, a, "slow")
	conn, err := pgx.ConnectConfig(context.Background(), e.cc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var rows, applied int
	if err := conn.QueryRow(context.Background(), "select count(*) from example where i = 2").Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(context.Background(), "select count(*) from lanes_history where lane = 'slow' and version = 1 and error is null").Scan(&applied); err != nil {
		t.Fatal(err)
	}
	if rows != 1 || applied != 1 || g.runs.Load() < 2 {
		t.Fatalf("rows=%d applied=%d runs=%d: want the killed run rolled back and one run committed", rows, applied, g.runs.Load())
	}
}

func TestCloseStopsARunningMigration(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	r := e.replica(fastLane, slowLane(g))
	waitStarted(t, g)
	done := make(chan error, 1)
	go func() { done <- r.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return while a migration ran")
	}
	if err := r.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
	// The lock is free and nothing of the migration stayed: another replica applies it.
	close(g.release)
	r2 := e.replica(fastLane, slowLane(g))
	waitDone(t, r2, "slow")
	if n := g.runs.Load(); n != 2 {
		t.Fatalf("runs = %d", n)
	}
}

func TestStartFailsFastOnABadDatabase(t *testing.T) {
	t.Parallel()
	cc, err := pgx.ParseConfig("postgres://nobody:s3cr3t@127.0.0.1:1/nowhere?connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	m, err := migrator.New(cc, []migrator.Lane{fastLane}, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := app.New(m, app.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	err = r.Start(context.Background())
	if err == nil || strings.Contains(err.Error(), "s3cr3t") {
		t.Fatalf("Start = %v", err)
	}
	if r.Ready() {
		t.Fatal("ready without a database")
	}
}

func ExampleRuntime() {
	ctx := context.Background()
	cc, err := pgx.ParseConfig(pgtest.ExampleDB())
	if err != nil {
		panic(err)
	}
	fast := migrator.Lane{Name: "fast", Mode: migrator.Blocking, FS: fstest.MapFS{
		"001_create.sql": {Data: []byte("create table items (id int primary key, name text);")},
	}}
	slow := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{
		// Re-runnable: an interrupted concurrent build leaves an INVALID index that "if not
		// exists" would keep, so drop whatever is there first.
		"001_index.sql": {Data: []byte("---- tern: disable-tx ----\ndrop index concurrently if exists items_name;\ncreate index concurrently items_name on items (name);")},
	}}
	m, err := migrator.New(cc, []migrator.Lane{fast, slow}, migrator.Config{})
	if err != nil {
		panic(err)
	}
	r, err := app.New(m, app.Config{})
	if err != nil {
		panic(err)
	}
	defer r.Close()
	if err := r.Start(ctx); err != nil { // returns once the fast lane is applied
		panic(err)
	}
	fmt.Println("ready:", r.Ready())
	done, err := r.Done("slow") // an error only for a lane the Migrator does not have
	if err != nil {
		panic(err)
	}
	select { // open the feature that needs the index once the slow lane is done
	case <-done:
		fmt.Println("search by name enabled")
	case <-time.After(30 * time.Second):
		fmt.Println("still waiting")
	}
	// Output:
	// ready: true
	// search by name enabled
}

// The listener's periodic check, not the backstop timer, notices that the applying session died.
func TestTakeoverThroughTheListenersCheck(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	m, err := migrator.New(e.cc, []migrator.Lane{fastLane, slowLane(g)}, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	// Neither the backstop timer nor a's own retry can move the lane on within the test.
	start := func() *app.Runtime {
		r, err := app.New(m, app.Config{TakeoverInterval: time.Hour, RetryMin: time.Hour, RetryMax: time.Hour,
			Notifier: notifier.Config{PingInterval: 200 * time.Millisecond}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		if err := r.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		return r
	}
	a := start()
	waitStarted(t, g)
	b := start()
	testkit.Eventually(t, "b waits for a", 10*time.Second, func() bool { return b.View().Lanes[1].Role == "waiting" })
	e.exec(`select pg_terminate_backend(l.pid) from pg_locks l
where l.locktype = 'advisory' and l.granted and l.pid <> pg_backend_pid() and l.database = (select oid from pg_database where datname = current_database())`)
	close(g.release)
	waitDone(t, b, "slow")
	waitDone(t, a, "slow")
	// a's run died with its session and a cannot retry within the test: b ran it again.
	if n := g.runs.Load(); n != 2 {
		t.Fatalf("slow migration ran %d times, want 2 (a's killed run, b's takeover)", n)
	}
}

// A replica whose listener polls (LISTEN deaf) and whose own background migration fails must
// not retry the failed file in a loop while its view of the lane lags.
func TestPermanentFailureWhilePollingIsNotRetriedInALoop(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cc, proxy := e.proxied()
	proxy.SetDeaf(true)
	bad := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{
		"001_ok.sql":  testkit.File("create table ok (i int);"),
		"002_bad.sql": testkit.File("select * from no_such_table;"),
	}}
	m, err := migrator.New(cc, []migrator.Lane{fastLane, bad}, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	var logs logbuf.Buffer
	r, err := app.New(m, app.Config{Logger: zerolog.New(&logs), Notifier: notifier.Config{PollInterval: time.Minute, ProbeTimeout: 100 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var fe *app.FailedError
	if err := r.Wait(ctx, "slow"); !errors.As(err, &fe) {
		t.Fatalf("Wait = %v, want *FailedError", err)
	}
	time.Sleep(500 * time.Millisecond)
	if n := strings.Count(logs.String(), "background migration failed"); n != 1 {
		t.Fatalf("the failure was logged %d times, want once (no retry loop)", n)
	}
}

// Close while Start applies the blocking lanes: Start starts nothing and reports it.
func TestCloseDuringStart(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	started := make(chan struct{})
	slowFast := migrator.Lane{Name: "fast", Funcs: []migrator.GoMigration{{Version: 1, Name: "slow_start", Up: func(ctx context.Context, c pgx.Tx) error {
		close(started)
		time.Sleep(500 * time.Millisecond)
		return nil
	}}}}
	r := e.runtime(slowFast)
	errc := make(chan error, 1)
	go func() { errc <- r.Start(context.Background()) }()
	<-started
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err == nil || r.Ready() {
		t.Fatalf("Start after Close = %v, ready %v; want an error and not ready", err, r.Ready())
	}
}

// An empty lane (a folder holding only a .gitkeep) is done at once on every replica.
func TestEmptyLaneIsDone(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	empty := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{".gitkeep": testkit.File("")}}
	r := e.runtime(fastLane, empty)
	if err := r.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := r.Wait(ctx, "slow"); err != nil || !r.IsDone("slow") || r.Version("slow") != 0 {
		t.Fatalf("Wait = %v, done %v, version %d", err, r.IsDone("slow"), r.Version("slow"))
	}
}

// blockingGoLane is a lane of one Go migration that signals started, then waits for release,
// honouring ctx only when obeysCtx.
func blockingGoLane(name string, mode migrator.Mode, started chan<- struct{}, release <-chan struct{}, obeysCtx bool) migrator.Lane {
	return migrator.Lane{Name: name, Mode: mode, Funcs: []migrator.GoMigration{{Version: 1, Name: "wait", Up: func(ctx context.Context, tx pgx.Tx) error {
		close(started)
		if !obeysCtx {
			<-release
			return nil
		}
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}}}}
}

// Close while Start applies a blocking lane cancels Start (it returns ErrClosed once the
// migration has rolled back) and waits for it: when Close returns, Start has returned, the lane
// is not applied and its lock is free. Before, Close returned at once and Start kept waiting.
func TestCloseCancelsAStartApplyingABlockingLane(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	started, release := make(chan struct{}), make(chan struct{})
	defer close(release)
	r := e.runtime(blockingGoLane("fast", migrator.Blocking, started, release, true))
	errc := make(chan error, 1)
	go func() { errc <- r.Start(context.Background()) }()
	<-started
	closed := make(chan error, 1)
	go func() { closed <- r.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close = %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Close did not return")
	}
	// Close has waited for Start's work: the migration rolled back and its lock is released
	// by now (read before Start's return value, which only its goroutine still has to send).
	conn, err := pgx.ConnectConfig(context.Background(), e.cc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var version, locks int
	if err := conn.QueryRow(context.Background(), "select coalesce((select max(version) from lanes_fast_version), 0)").Scan(&version); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(context.Background(), "select count(*) from pg_locks where locktype = 'advisory' and granted and database = (select oid from pg_database where datname = current_database())").Scan(&locks); err != nil {
		t.Fatal(err)
	}
	if version != 0 || locks != 0 {
		t.Fatalf("after Close: version %d, %d advisory locks held; want 0 and 0", version, locks)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, app.ErrClosed) {
			t.Fatalf("Start = %v, want ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Start did not return after Close")
	}
	if r.Ready() || r.IsDone("fast") {
		t.Fatal("ready or done after Close cancelled Start")
	}
	if err := r.Start(context.Background()); !errors.Is(err, app.ErrClosed) {
		t.Fatalf("Start after Close = %v, want ErrClosed", err)
	}
}

// A Go migration that ignores its context cannot hang Close (and so SIGTERM): Close gives up
// after CloseTimeout and says what is still running, in Start and in the background lanes.
// Before, Close waited forever for a background migration, and returned nil at once while Start
// still ran.
func TestCloseIsBoundedWhenAMigrationIgnoresItsContext(t *testing.T) {
	t.Parallel()
	for _, mode := range []migrator.Mode{migrator.Blocking, migrator.Background} {
		t.Run(mode.String(), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			started, release := make(chan struct{}), make(chan struct{})
			lanes := []migrator.Lane{blockingGoLane("fast", migrator.Blocking, started, release, false)}
			if mode == migrator.Background {
				lanes = []migrator.Lane{fastLane, blockingGoLane("slow", migrator.Background, started, release, false)}
			}
			r := e.runtimeWith(func(c *app.Config) { c.CloseTimeout = 200 * time.Millisecond }, lanes...)
			errc := make(chan error, 1)
			go func() { errc <- r.Start(context.Background()) }()
			<-started
			closed := make(chan error, 1)
			go func() { closed <- r.Close() }()
			var err error
			select {
			case err = <-closed:
			case <-time.After(20 * time.Second):
				close(release)
				t.Fatal("Close hung on a migration that ignores its context")
			}
			if err == nil || !strings.Contains(err.Error(), "still running") {
				t.Errorf("Close = %v, want an error saying what is still running", err)
			}
			if again := r.Close(); again == nil || again.Error() != err.Error() {
				t.Errorf("second Close = %v, want the first one's error", again)
			}
			close(release) // let the stray migration end: nothing may start after it
			startErr := <-errc
			if mode == migrator.Blocking && !errors.Is(startErr, app.ErrClosed) {
				t.Errorf("Start = %v, want ErrClosed", startErr)
			}
			if mode == migrator.Blocking && r.Ready() {
				t.Error("ready after Close")
			}
		})
	}
}

func TestDoneOfAnUnknownLaneIsAnError(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	r := e.runtime(fastLane)
	if ch, err := r.Done("no_such_lane"); !errors.Is(err, migrator.ErrUnknownLane) || ch != nil {
		t.Fatalf("Done(unknown) = %v, %v; want nil and ErrUnknownLane", ch, err)
	}
	if _, err := r.Done("fast"); err != nil {
		t.Fatal(err)
	}
}

// slowOKWriter holds back each migration's "OK" line, as a busy log sink can, while other
// goroutines' lines go through.
type slowOKWriter struct{ buf logbuf.Buffer }

func (w *slowOKWriter) Write(p []byte) (int, error) {
	if strings.Contains(string(p), `"OK   `) {
		time.Sleep(300 * time.Millisecond)
	}
	return w.buf.Write(p)
}

// A replica logs "lane done" after the "OK" lines of the files it applied, never before, even
// when its listener hears the commit first.
func TestLaneDoneIsLoggedAfterTheOKLines(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var w slowOKWriter
	slow := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{"001_more.sql": testkit.File("insert into example values (2);")}}
	m, err := migrator.New(e.cc, []migrator.Lane{fastLane, slow}, migrator.Config{Logger: zerolog.New(&w)})
	if err != nil {
		t.Fatal(err)
	}
	r, err := app.New(m, app.Config{Logger: zerolog.New(&w)})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := r.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := r.Wait(ctx, "slow"); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "both lanes logged done", 10*time.Second, func() bool { return strings.Count(w.buf.String(), `"lane done"`) == 2 })
	logs := w.buf.String()
	for lane, last := range map[string]string{"fast": "002_seed.sql", "slow": "001_more.sql"} {
		ok := strings.Index(logs, `"OK   `+last)
		done := strings.Index(logs, `"lane":"`+lane+`","version"`)
		for done >= 0 && !strings.Contains(logs[done:done+strings.Index(logs[done:], "\n")], `"lane done"`) {
			next := strings.Index(logs[done+1:], `"lane":"`+lane+`","version"`)
			if next < 0 {
				done = -1
				break
			}
			done += 1 + next
		}
		if ok < 0 || done < 0 || done < ok {
			t.Errorf("lane %s: want its OK line, then lane done:\n%s", lane, logs)
		}
	}
}
