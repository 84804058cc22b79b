package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/multilanes/lanes/app"
)

// shutdownTimeout bounds the graceful shutdown of the HTTP server.
const shutdownTimeout = 10 * time.Second

func serveFlags(fs *flag.FlagSet) commandBody {
	addr := fs.String("addr", "", "listen `address` (env LANES_ADDR; default :8080)")
	allowDrift := fs.Bool("allow-drift", false, "apply pending migrations although applied files were renamed or changed since\nthey were applied, and report such lanes done rather than drift")
	return func(ctx context.Context, c *command, args []string) error {
		if len(args) > 0 {
			return usageErrorf("unexpected arguments %q", args)
		}
		c.allowDrift = *allowDrift
		a := *addr
		if a == "" {
			a = c.env.getenv("LANES_ADDR")
		}
		if a == "" {
			a = ":8080"
		}
		return runServe(ctx, c, a)
	}
}

// runServe runs one app replica until ctx is cancelled. The HTTP listener comes first, so
// /healthz answers and /readyz says 503 while the blocking lanes are applied; then the runtime
// starts (blocking lanes, then background lanes in its own goroutines). On cancellation the HTTP
// server shuts down gracefully, then the runtime closes, and runServe returns nil.
func runServe(ctx context.Context, c *command, addr string) error {
	tu, err := c.tuning()
	if err != nil {
		return err
	}
	m, err := c.migrator()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	if c.env.onListen != nil {
		c.env.onListen(ln.Addr())
	}
	if m, err = c.forPooler(ctx, m); err != nil {
		ln.Close()
		return err
	}
	r, err := app.New(m, app.Config{Logger: c.log, TakeoverInterval: tu.takeover, Notifier: tu.notifierConfig(), WaitForDatabase: true, KeepListening: tu.keepListening})
	if err != nil {
		ln.Close()
		return err
	}
	defer r.Close()
	srv := &http.Server{
		Handler:           r.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.New(c.log.With().Str("component", "http").Logger(), "", 0),
	}
	srv.RegisterOnShutdown(r.StopEvents) // Shutdown waits for handlers: end the page's streams
	serveErr := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Go(func() { serveErr <- srv.Serve(ln) })
	shutdown := func() error {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
		defer cancel()
		err := srv.Shutdown(sctx)
		wg.Wait()
		if err != nil {
			return fmt.Errorf("shut down http server: %w", err)
		}
		return nil
	}
	c.log.Info().Str("addr", ln.Addr().String()).Str("target", target(m.ConnConfig())).
		Msg("serving the page at /, /events, /healthz, /readyz, /lanes and /metrics; applying the blocking lanes")

	// Start runs in its own goroutine so that a signal during it is answered by Close, which
	// cancels Start and waits for it at most app.Config.CloseTimeout: a migration that ignores
	// its context cannot keep the process from exiting.
	started := make(chan error, 1)
	go func() { started <- r.Start(ctx) }()
	select {
	case err := <-started:
		if err != nil {
			serr := shutdown()
			if ctx.Err() != nil {
				c.log.Info().Msg("stopped before the replica was ready")
				return serr
			}
			return errors.Join(err, serr)
		}
	case <-ctx.Done():
		serr := shutdown()
		if cerr := r.Close(); cerr != nil {
			return errors.Join(cerr, serr) // Start may still run: the process exits anyway
		}
		<-started // Close returned without error: Start has returned
		c.log.Info().Msg("stopped before the replica was ready")
		return serr
	}
	c.log.Info().Msg("ready: /readyz answers 200")

	var runErr error
	select {
	case <-ctx.Done():
		c.log.Info().Msg("shutting down")
	case err := <-serveErr:
		runErr = fmt.Errorf("http server: %w", err)
	}
	if err := shutdown(); err != nil && runErr == nil {
		runErr = err
	}
	if err := r.Close(); err != nil && runErr == nil {
		runErr = err
	}
	if runErr == nil {
		c.log.Info().Msg("stopped gracefully")
	}
	return runErr
}
