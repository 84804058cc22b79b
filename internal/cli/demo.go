package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/pgcluster"
	"github.com/multilanes/lanes/migrations"
	"github.com/multilanes/lanes/migrator"
)

// demoOptions tune the demo; tests shorten it.
type demoOptions struct {
	loadDuration time.Duration // how long the slow lane's Go migration loads data
	replicas     int           // app replicas sharing the database
	workInterval time.Duration // how often the app says it can do some work
	localTimeout time.Duration // bounds the attempt to reach the local server by libpq defaults
	waitTimeout  time.Duration // bounds the wait for the slow lane beyond loadDuration
}

func defaultDemoOptions() demoOptions {
	return demoOptions{
		loadDuration: 5 * time.Second,
		replicas:     3,
		workInterval: time.Second,
		localTimeout: 3 * time.Second,
		waitTimeout:  2 * time.Minute,
	}
}

// The demo's lanes: the embedded demo migrations.
const (
	demoSlowLane = "slow"
)

func demoFlags(*flag.FlagSet) commandBody {
	return func(ctx context.Context, c *command, args []string) error {
		if len(args) > 0 {
			return usageErrorf("unexpected arguments %q", args)
		}
		return runDemo(ctx, c)
	}
}

// demoServer is the PostgreSQL server the demo runs on.
type demoServer struct {
	admin  *pgx.ConnConfig // a database on the server where the demo may create databases
	source string          // how it was found
	stop   func() error    // stops a throwaway cluster; nil otherwise
}

// runDemo plays the seed story in one process: it picks a server, creates a throwaway database,
// starts the replicas one after the other (each applies or finds the fast lane, then serves),
// lets the app work while one replica applies the slow lane in the background, shows that every
// other replica learns of the completion through LISTEN/NOTIFY, then closes everything and
// drops the database (and stops the throwaway cluster, if it started one).
func runDemo(ctx context.Context, c *command) (err error) {
	o := c.env.demo
	srv, err := chooseDemoServer(ctx, c)
	if err != nil {
		return err
	}
	if srv.stop != nil {
		defer func() {
			if serr := srv.stop(); serr != nil {
				err = errors.Join(err, fmt.Errorf("stop throwaway cluster: %w", serr))
			} else {
				c.log.Info().Msg("throwaway cluster stopped")
			}
		}()
	}
	c.log.Info().Str("server", target(srv.admin)).Str("found_by", srv.source).Msg("demo server")

	dbCfg, drop, err := createDemoDatabase(ctx, srv.admin)
	if err != nil {
		return err
	}
	defer func() {
		if derr := drop(); derr != nil {
			err = errors.Join(err, derr)
		} else {
			c.log.Info().Str("database", dbCfg.Database).Msg("demo database dropped")
		}
	}()
	c.log.Info().Str("database", dbCfg.Database).Int("replicas", o.replicas).
		Msg("created a fresh demo database; starting the app's replicas on it")

	// Start the replicas one after the other, like pods of a rolling deploy: the first applies
	// the fast lane; the others find it done and are ready at once, even while the slow lane runs.
	var applier atomic.Int32 // 1-based index of the replica that applied the slow lane
	var replicas []*app.Runtime
	defer func() {
		for _, r := range replicas {
			_ = r.Close() // already closed on the normal path: Close is idempotent
		}
	}()
	for i := 1; i <= o.replicas; i++ {
		log := c.log.With().Str("replica", fmt.Sprintf("r%d", i)).Logger()
		m, err := migrator.New(dbCfg, demoLanes(int32(i), &applier, log), migrator.Config{
			Batch:   migrations.BatchConfig(o.loadDuration),
			Channel: c.set.channel,
			Logger:  log.With().Str("operation", "migratedb").Logger(),
			Now:     c.env.now,
		})
		if err != nil {
			return fmt.Errorf("load demo migrations: %w", err)
		}
		// No replica dies in the demo: keep takeover attempts out of the story, so the replicas
		// that do not apply the slow lane learn of it from the listener alone.
		r, err := app.New(m, app.Config{Logger: log, TakeoverInterval: time.Hour})
		if err != nil {
			return err
		}
		replicas = append(replicas, r)
		log.Info().Str("operation", "migratedb").Msg("applying db migrations")
		start := c.env.now()
		if err := r.Start(ctx); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("interrupted: %w", ctx.Err())
			}
			return fmt.Errorf("replica r%d: %w", i, err)
		}
		log.Info().Float64("ready_in_s", c.env.now().Sub(start).Seconds()).Bool("slow_lane_done", r.IsDone(demoSlowLane)).
			Msg("replica ready: the fast lane is applied, the app may serve")
	}

	learnedAt, err := waitForSlowLane(ctx, c, replicas)
	if err != nil {
		return err
	}
	// The others can hear of the commit before the applier has logged its own "OK" line: let it
	// finish (an in-process check of its view, no query), so the story reads in order.
	waitApplierIdle(ctx, replicas)
	committed, err := slowLaneCommitTime(ctx, dbCfg)
	if err != nil {
		return err
	}
	for i, r := range replicas {
		view := r.View()
		via := ""
		for _, k := range view.Lanes {
			if k.Name == demoSlowLane {
				via = k.Via
			}
		}
		ev := c.log.Info().Str("replica", fmt.Sprintf("r%d", i+1)).Str("lane", demoSlowLane).Str("via", via).
			Float64("after_commit_s", learnedAt[i].Sub(committed).Seconds()).Int("notifications_received", view.Notifications)
		switch {
		case applier.Load() == int32(i+1):
			ev.Msg("this replica applied the slow lane itself")
		case via == "notification":
			ev.Msg("learned through LISTEN/NOTIFY that the slow lane is done, without polling")
		default:
			ev.Msg("learned that the slow lane is done")
		}
	}
	c.log.Info().Msg("background migrations completed")

	rows, indexValid, err := demoFeature(ctx, dbCfg)
	if err != nil {
		return err
	}
	c.log.Info().Int64("loaded_rows", rows).Bool("index_valid", indexValid).
		Msg("app can fully proceed now that long running migrations are passed")

	for _, r := range replicas {
		if err := r.Close(); err != nil {
			return err
		}
	}
	c.log.Info().Msg("app exited gracefully")
	return nil
}

// waitApplierIdle waits, at most 5 s, until no replica is inside its slow-lane migration call.
func waitApplierIdle(ctx context.Context, replicas []*app.Runtime) {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		busy := false
		for _, r := range replicas {
			for _, k := range r.View().Lanes {
				busy = busy || (k.Name == demoSlowLane && k.Role == "applying")
			}
		}
		if !busy {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitForSlowLane logs that the app can work once every workInterval until every replica has
// learned that the slow lane is done, and returns when each learned it. It costs no query: each
// replica's Wait returns when its listener confirms the completion.
func waitForSlowLane(ctx context.Context, c *command, replicas []*app.Runtime) ([]time.Time, error) {
	o := c.env.demo
	wctx, cancel := context.WithTimeout(ctx, o.loadDuration+o.waitTimeout)
	defer cancel()
	type learned struct {
		i   int
		at  time.Time
		err error
	}
	results := make(chan learned, len(replicas))
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // runs before wg.Wait: stops the waiters on an early return
	for i, r := range replicas {
		wg.Go(func() {
			err := r.Wait(wctx, demoSlowLane)
			results <- learned{i: i, at: c.env.now(), err: err}
		})
	}
	tick := time.NewTicker(o.workInterval)
	defer tick.Stop()
	c.log.Info().Int("replicas_serving", len(replicas)).
		Msg("app can do some work while the long-running migrations run in the background")
	// While the lane runs, say only what changes: the slow lane's version as each replica knows
	// it (from its own view, no query), not the same line every second.
	last, lastProgress := "", ""
	work := func() {
		versions := make([]string, len(replicas))
		for i, r := range replicas {
			for _, k := range r.View().Lanes {
				if k.Name == demoSlowLane {
					versions[i] = fmt.Sprintf("r%d=%d", i+1, k.Version)
				}
			}
		}
		if now := strings.Join(versions, " "); now != last {
			if last != "" {
				c.log.Info().Str("slow_lane_versions", now).Int("replicas_serving", len(replicas)).
					Msg("the replicas learned that the slow lane moved on; all of them keep serving")
			}
			last = now
		}
		// The backfill's progress as each replica knows it, from the applier's announcements.
		seen := make([]string, 0, len(replicas))
		for i, r := range replicas {
			if p := r.Progress(demoSlowLane); p != nil && p.Percent != nil && p.Done > 0 {
				seen = append(seen, fmt.Sprintf("r%d=%.0f%%", i+1, *p.Percent))
			}
		}
		if now := strings.Join(seen, " "); now != "" && now != lastProgress {
			c.log.Info().Str("slow_lane_progress", now).Int("replicas_serving", len(replicas)).
				Msg("every replica sees the backfill's progress, announced by the one applying it")
			lastProgress = now
		}
	}
	work()
	at := make([]time.Time, len(replicas))
	for pending := len(replicas); pending > 0; {
		select {
		case <-tick.C:
			work()
		case l := <-results:
			var fe *app.FailedError
			switch {
			case l.err == nil:
			case errors.As(l.err, &fe):
				return nil, fmt.Errorf("the slow lane failed: %w", fe)
			case ctx.Err() != nil:
				return nil, fmt.Errorf("interrupted: %w", ctx.Err())
			case wctx.Err() != nil:
				return nil, fmt.Errorf("the slow lane was not done within %s: %w", o.loadDuration+o.waitTimeout, l.err)
			default:
				return nil, fmt.Errorf("replica r%d: wait for the slow lane: %w", l.i+1, l.err)
			}
			at[l.i] = l.at
			pending--
		}
	}
	return at, nil
}

// demoLanes returns the embedded demo lanes for replica i: the slow lane's Go migration is
// wrapped to record that this replica won the lane's lock and applies it.
func demoLanes(i int32, applier *atomic.Int32, log zerolog.Logger) []migrator.Lane {
	lanes := migrations.Lanes()
	for li := range lanes {
		if lanes[li].Name != demoSlowLane {
			continue
		}
		funcs := slices.Clone(lanes[li].Funcs)
		for fi := range funcs {
			bf := *funcs[fi].Backfill
			walk := bf.Range
			bf.Range = func(ctx context.Context, tx pgx.Tx, lo, hi int64) error {
				if applier.CompareAndSwap(0, i) {
					log.Info().Str("lane", demoSlowLane).
						Msg("won the slow lane's lock: backfilling the example table in batches while every replica serves")
				}
				return walk(ctx, tx, lo, hi)
			}
			funcs[fi].Backfill = &bf
		}
		lanes[li].Funcs = funcs
	}
	return lanes
}

// chooseDemoServer picks the server: DATABASE_URL (or --database-url), else the local server by
// libpq defaults, else a throwaway cluster from the PostgreSQL binaries on the machine.
func chooseDemoServer(ctx context.Context, c *command) (*demoServer, error) {
	if c.set.databaseURL != "" {
		cfg, err := c.connConfig()
		if err != nil {
			return nil, err
		}
		if err := ping(ctx, cfg); err != nil {
			return nil, fmt.Errorf("connect to %s (from --database-url or DATABASE_URL): %w", target(cfg), err)
		}
		return &demoServer{admin: cfg, source: "DATABASE_URL"}, nil
	}
	cfg, err := pgx.ParseConfig("")
	if err != nil {
		return nil, fmt.Errorf("libpq defaults (PGHOST, PGPORT, ...): %w", err)
	}
	cfg.ConnectTimeout = c.env.demo.localTimeout
	perr := ping(ctx, cfg)
	if perr == nil {
		cfg.ConnectTimeout = defaultConnectTimeout
		return &demoServer{admin: cfg, source: "local server (libpq defaults)"}, nil
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	c.log.Info().Str("tried", target(cfg)).Str("error", perr.Error()).
		Msg("no DATABASE_URL and no local server answered: starting a throwaway PostgreSQL cluster")
	cl, err := pgcluster.Start(ctx, pgcluster.Options{Logger: c.log})
	if errors.Is(err, pgcluster.ErrNoBinaries) {
		return nil, errors.New("no PostgreSQL server for the demo: set DATABASE_URL (or --database-url) to a server " +
			"where the demo may create a database, start a local server reachable with the libpq defaults " +
			"(PGHOST, PGPORT, PGUSER), or install the PostgreSQL server binaries (or set LANES_PG_BINDIR) " +
			"so the demo can start a throwaway cluster")
	}
	if err != nil {
		return nil, fmt.Errorf("start a throwaway cluster: %w", err)
	}
	ccfg, err := pgx.ParseConfig(cl.ConnString("postgres"))
	if err != nil {
		_ = cl.Stop()
		return nil, fmt.Errorf("throwaway cluster: %w", err)
	}
	ccfg.ConnectTimeout = defaultConnectTimeout
	return &demoServer{admin: ccfg, source: "throwaway cluster", stop: cl.Stop}, nil
}

// ping connects once and closes the connection.
func ping(ctx context.Context, cfg *pgx.ConnConfig) error {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// createDemoDatabase creates lanes_demo_<random hex> on the admin connection's server and
// returns its configuration and a function that drops it, closing any session left in it.
func createDemoDatabase(ctx context.Context, admin *pgx.ConnConfig) (*pgx.ConnConfig, func() error, error) {
	var b [4]byte
	_, _ = rand.Read(b[:])
	name := "lanes_demo_" + hex.EncodeToString(b[:])
	ident := pgx.Identifier{name}.Sanitize()
	exec := func(ctx context.Context, sql string) error {
		conn, err := pgx.ConnectConfig(ctx, admin)
		if err != nil {
			return err
		}
		defer conn.Close(context.WithoutCancel(ctx))
		_, err = conn.Exec(ctx, sql)
		return err
	}
	if err := exec(ctx, "create database "+ident); err != nil {
		return nil, nil, fmt.Errorf("create demo database %s on %s (the role needs CREATEDB): %w", name, target(admin), err)
	}
	cfg := admin.Copy()
	cfg.Database = name
	drop := func() error {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err := exec(dctx, "drop database if exists "+ident+" with (force)"); err != nil {
			return fmt.Errorf("drop demo database %s: %w", name, err)
		}
		return nil
	}
	return cfg, drop, nil
}

// slowLaneCommitTime reads when the slow lane's last migration was recorded, just before its
// commit, from the history table (the time comes from the applying Migrator's clock).
func slowLaneCommitTime(ctx context.Context, cfg *pgx.ConnConfig) (time.Time, error) {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return time.Time{}, fmt.Errorf("connect to %s: %w", target(cfg), err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var at time.Time
	err = conn.QueryRow(ctx, "select finished_at from "+pgx.Identifier{migrator.DefaultHistoryTable}.Sanitize()+
		" where lane = $1 and error is null order by id desc limit 1", demoSlowLane).Scan(&at)
	if err != nil {
		return time.Time{}, fmt.Errorf("read the slow lane's history: %w", err)
	}
	return at, nil
}

// demoFeature is the feature the slow lane opens: the loaded rows, served by the new index.
func demoFeature(ctx context.Context, cfg *pgx.ConnConfig) (rows int64, indexValid bool, err error) {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return 0, false, fmt.Errorf("connect to %s: %w", target(cfg), err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	err = conn.QueryRow(ctx, `select (select count(*) from example where loaded),
  coalesce((select indisvalid from pg_index where indexrelid = to_regclass('example_loaded_name_idx')), false)`).Scan(&rows, &indexValid)
	if err != nil {
		return 0, false, fmt.Errorf("query the example table: %w", err)
	}
	return rows, indexValid, nil
}
