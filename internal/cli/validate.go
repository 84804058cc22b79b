package cli

import (
	"context"
	"flag"
	"fmt"
)

func validateFlags(fs *flag.FlagSet) commandBody {
	strict := fs.Bool("strict", false, "exit 1 when lint finds anything, not only when a lane does not load")
	return func(ctx context.Context, c *command, args []string) error {
		if len(args) > 0 {
			return usageErrorf("unexpected arguments %q", args)
		}
		return runValidate(c, *strict)
	}
}

func lintFlags(fs *flag.FlagSet) commandBody {
	return func(ctx context.Context, c *command, args []string) error {
		if len(args) > 0 {
			return usageErrorf("unexpected arguments %q", args)
		}
		return runValidate(c, true)
	}
}

// runValidate loads and renders every lane without connecting (names, numbering, templates,
// directives), prints what it found and the lint warnings. It fails when a lane does not load,
// and with strict also when there is a warning.
func runValidate(c *command, strict bool) error {
	m, err := c.migrator()
	if err != nil {
		return err
	}
	for _, l := range m.Lanes() {
		fmt.Fprintf(c.env.stdout, "lane %s (%s, version table %s): %d migrations\n", l.Name, l.Mode, l.VersionTable, l.Latest)
	}
	warnings := m.Lint()
	for _, w := range warnings {
		fmt.Fprintf(c.env.stdout, "warning: %s\n", w)
	}
	if strict && len(warnings) > 0 {
		return fmt.Errorf("%d lint warnings", len(warnings))
	}
	fmt.Fprintf(c.env.stdout, "ok: every lane loads (%d lint warnings)\n", len(warnings))
	return nil
}
