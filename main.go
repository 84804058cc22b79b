// Command lanes applies PostgreSQL migrations in lanes: blocking lanes before a replica is ready,
// background lanes after, with each lane's completion announced through LISTEN/NOTIFY.
// Run `lanes --help` for the commands, flags, environment variables and exit codes.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/multilanes/lanes/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
