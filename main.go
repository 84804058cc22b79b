// Command lanes applies PostgreSQL migrations in lanes: blocking lanes before a replica is ready,
// background lanes after, with each lane's completion announced through LISTEN/NOTIFY.
// The whole program is lanescli.Main with a zero Config: a service with Go migrations builds the
// same command line into a binary of its own with lanescli.Config.Funcs.
// Run `lanes --help` for the commands, flags, environment variables and exit codes.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/multilanes/lanes/lanescli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := lanescli.Main(ctx, os.Args[1:], os.Stdout, os.Stderr, lanescli.Config{})
	stop()
	os.Exit(code)
}
