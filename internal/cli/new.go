package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/multilanes/lanes/migrator"
)

func newFlags(fs *flag.FlagSet) commandBody {
	lane := fs.String("lane", "", "the `lane` whose folder gets the file (required)")
	return func(_ context.Context, c *command, args []string) error {
		switch {
		case *lane == "":
			return usageErrorf("--lane is required")
		case len(args) == 0:
			return usageErrorf("a TITLE is required, such as: lanes new --lane slow add_index")
		}
		path, err := runNew(c, *lane, strings.Join(args, " "))
		if err != nil {
			return err
		}
		fmt.Fprintln(c.env.stdout, path)
		return nil
	}
}

var (
	numberedFile = regexp.MustCompile(`\A(\d+)_.+\.sql\z`)
	notWord      = regexp.MustCompile(`[^a-z0-9]+`)
)

// newFileTemplate is the content of a new migration file; %s is its name, %s its lane.
const newFileTemplate = `-- %s (lane %s)
--
-- Write the migration above the separator. It runs in one transaction together with the
-- lane's version bump, and it is a Go text/template like every tern migration.
-- For statements that cannot run in a transaction, such as CREATE INDEX CONCURRENTLY, add
-- the line "---- tern: disable-tx ----" (on a line of its own, without the leading "-- ").

---- create above / drop below ----

-- Undo the migration here (tern's down migration; lanes itself only migrates up).
`

// runNew creates the next numbered migration file of the lane and returns its path.
func runNew(c *command, lane, title string) (string, error) {
	if c.set.migrations == "" {
		return "", usageErrorf("new needs a migrations folder: set --migrations or LANES_MIGRATIONS")
	}
	if st, err := os.Stat(c.set.migrations); err != nil {
		return "", fmt.Errorf("migrations folder (--migrations or LANES_MIGRATIONS): %w", err)
	} else if !st.IsDir() {
		return "", fmt.Errorf("migrations folder (--migrations or LANES_MIGRATIONS) %s is not a folder", c.set.migrations)
	}
	decls, err := parseLaneDecls(c.set.lanes)
	if err != nil {
		return "", usageErrorf("invalid lanes (--lanes or LANES_LANES): %w", err)
	}
	if len(decls) == 0 {
		decls = migrator.DefaultLaneDecls()
	}
	if !slices.ContainsFunc(decls, func(d migrator.LaneDecl) bool { return d.Name == lane }) {
		var names []string
		for _, d := range decls {
			names = append(names, d.Name)
		}
		return "", usageErrorf("unknown lane %q (lanes: %s); declare it with --lanes", lane, strings.Join(names, ", "))
	}
	slug := strings.Trim(notWord.ReplaceAllString(strings.ToLower(title), "_"), "_")
	if slug == "" {
		return "", usageErrorf("title %q has no letters or digits", title)
	}
	dir := filepath.Join(c.set.migrations, lane)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create lane folder: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("read lane folder: %w", err)
	}
	last, width := 0, 3 // the width of the highest-numbered file; 3 digits for the first one
	for _, e := range entries {
		m := numberedFile.FindStringSubmatch(e.Name())
		if e.IsDir() || m == nil {
			continue
		}
		n, err := strconv.Atoi(m[1])
		if err != nil {
			continue
		}
		if n > last {
			last, width = n, len(m[1])
		}
	}
	name := fmt.Sprintf("%0*d_%s.sql", width, last+1, slug)
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return "", fmt.Errorf("%s already exists", path)
		}
		return "", fmt.Errorf("create migration file: %w", err)
	}
	if _, err := fmt.Fprintf(f, newFileTemplate, name, lane); err != nil {
		f.Close()
		return "", fmt.Errorf("write migration file: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("write migration file: %w", err)
	}
	c.log.Info().Str("lane", lane).Str("file", name).Msg("created migration file: write its SQL above the separator")
	return path, nil
}
