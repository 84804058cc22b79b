// Package lanescli is the lanes command line as a library: a service that registers Go
// migrations builds the same CLI into a binary of its own, as goose.Run and tern's code
// package let you do, so that migrate, status, wait and serve know its Go migrations.
//
// The stock lanes binary is this package with a zero Config. It reads lanes from the folder
// given by --migrations (or LANES_MIGRATIONS), one subfolder per lane; a Go migration has no
// file there, so its lane's numbering has a gap that the stock binary reports ("version 3 is
// missing ... probably a Go migration"). A binary of your own registers those migrations:
//
//	func main() {
//		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
//		code := lanescli.Main(ctx, os.Args[1:], os.Stdout, os.Stderr, lanescli.Config{
//			Funcs: map[string][]migrator.GoMigration{
//				"slow": {{Version: 3, Name: "backfill", Revision: "1", Up: backfill}},
//			},
//		})
//		stop()
//		os.Exit(code)
//	}
//
// Run `lanes --help` for the commands, flags, environment variables and exit codes.
package lanescli

import (
	"context"
	"io"

	"github.com/multilanes/lanes/internal/cli"
	"github.com/multilanes/lanes/migrator"
)

// Exit codes returned by Main.
const (
	ExitOK      = cli.ExitOK      // success
	ExitError   = cli.ExitError   // bad configuration, unreachable database, failed migration
	ExitUsage   = cli.ExitUsage   // unknown command or flag, missing argument or migrations folder
	ExitTimeout = cli.ExitTimeout // wait's --timeout expired
)

// Config is what a binary adds to the command line. The zero value is the stock lanes binary.
type Config struct {
	// Funcs are Go migrations by lane name. They join the files of the lane's folder (given by
	// --migrations) or of the lane in Lanes: numbers run from 1 without gaps across files and
	// Go migrations together. A lane named here that is not loaded is an error, never skipped;
	// a lane of Go migrations only needs a folder all the same (it may hold only a .gitkeep).
	Funcs map[string][]migrator.GoMigration
	// Lanes, when set, are the lanes built into the binary (files embedded with go:embed, Go
	// migrations in their Funcs), used by migrate, status, wait and serve when neither
	// --migrations nor LANES_MIGRATIONS is given; --lanes then selects, orders and sets the
	// modes of these lanes. Default: none, and those commands need a migrations folder.
	Lanes []migrator.Lane
}

// Main runs the lanes command line with args (the arguments after the program name, such as
// os.Args[1:]) and returns the process exit code; it never exits the process itself.
// Environment variables are read from the process. Results go to stdout, logs and errors to
// stderr. Cancelling ctx stops the running command (serve shuts down gracefully and returns
// ExitOK): pass a context cancelled on SIGINT and SIGTERM.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer, cfg Config) int {
	return cli.Main(ctx, args, stdout, stderr, cli.Built{Lanes: cfg.Lanes, Funcs: cfg.Funcs})
}
