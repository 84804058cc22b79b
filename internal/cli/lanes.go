package cli

import (
	"fmt"
	"io/fs"
	"os"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

// Built is what a binary of the user's own builds into the command line (see lanescli.Config).
// The zero value is the stock lanes binary.
type Built struct {
	// Lanes are used by migrate, status, wait and serve when no migrations folder is given.
	Lanes []migrator.Lane
	// Funcs are Go migrations by lane name, added to the lanes of the migrations folder (or to
	// Lanes).
	Funcs map[string][]migrator.GoMigration
}

// errNoMigrations is the usage error of a command that needs migrations when neither
// --migrations nor LANES_MIGRATIONS is set and the binary has no lanes of its own.
func errNoMigrations(command string) error {
	return usageErrorf("%s needs the migrations: set --migrations DIR or LANES_MIGRATIONS to the folder holding one subfolder per lane (only 'lanes demo' uses the embedded demo migrations)", command)
}

// laneSpecs returns the lanes to load: from the --migrations folder, else the lanes built into
// the binary (Built.Lanes), each with the Go migrations the binary registers on it. With
// neither it is a usage error, and nothing is touched: the embedded demo migrations belong to
// the demo command alone.
func (c *command) laneSpecs() ([]migrator.Lane, error) {
	decls, err := parseLaneDecls(c.set.lanes)
	if err != nil {
		return nil, usageErrorf("invalid lanes (--lanes or LANES_LANES): %w", err)
	}
	var lanes []migrator.Lane
	if c.set.migrations == "" {
		if len(c.env.built.Lanes) == 0 {
			return nil, errNoMigrations(c.name)
		}
		if lanes, err = builtLanes(c.env.built.Lanes, decls); err != nil {
			return nil, err
		}
	} else {
		st, err := os.Stat(c.set.migrations)
		if err != nil {
			return nil, fmt.Errorf("migrations folder (--migrations or LANES_MIGRATIONS): %w", err)
		}
		if !st.IsDir() {
			return nil, fmt.Errorf("migrations folder (--migrations or LANES_MIGRATIONS) %s is not a folder", c.set.migrations)
		}
		if lanes, err = migrator.LanesFromFS(os.DirFS(c.set.migrations), decls); err != nil {
			return nil, fmt.Errorf("migrations folder %s: %w", c.set.migrations, err)
		}
	}
	if err := addFuncs(lanes, c.env.built.Funcs); err != nil {
		return nil, err
	}
	if err := checkGaps(lanes, c.env.built.Funcs != nil || len(c.env.built.Lanes) > 0); err != nil {
		return nil, err
	}
	return lanes, nil
}

// builtLanes returns the binary's own lanes, reordered and with the modes and version tables
// given by decls when there are any.
func builtLanes(all []migrator.Lane, decls []migrator.LaneDecl) ([]migrator.Lane, error) {
	if len(decls) == 0 {
		return slices.Clone(all), nil
	}
	var out []migrator.Lane
	for _, d := range decls {
		i := slices.IndexFunc(all, func(l migrator.Lane) bool { return l.Name == d.Name })
		if i < 0 {
			return nil, usageErrorf("this binary's lanes have no lane %q (they have %s): set --migrations", d.Name, laneNames(all))
		}
		l := all[i]
		l.Mode = d.Mode
		if d.VersionTable != "" {
			l.VersionTable = d.VersionTable
		}
		out = append(out, l)
	}
	return out, nil
}

// addFuncs adds the Go migrations registered by lane name to the lanes. Go migrations of a
// lane that is not loaded are an error: they must not be skipped silently.
func addFuncs(lanes []migrator.Lane, funcs map[string][]migrator.GoMigration) error {
	names := make([]string, 0, len(funcs))
	for name := range funcs {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		i := slices.IndexFunc(lanes, func(l migrator.Lane) bool { return l.Name == name })
		if i < 0 {
			return fmt.Errorf("this binary registers Go migrations on lane %q, which is not among the lanes loaded (%s): give it a folder (it may hold only a .gitkeep) and declare it with --lanes", name, laneNames(lanes))
		}
		lanes[i].Funcs = append(slices.Clone(lanes[i].Funcs), funcs[name]...)
	}
	return nil
}

var sqlFileName = regexp.MustCompile(`\A(\d+)_.+\.sql\z`)

// checkGaps finds a lane whose numbering has a hole that neither a file nor a Go migration
// fills, and says which version is missing. In the stock binary (custom false) a hole is most
// likely a Go migration, which only a binary built with lanescli can run: the error says so.
// Other problems of the files are left to the migrator, which names them.
func checkGaps(lanes []migrator.Lane, custom bool) error {
	for _, l := range lanes {
		have := map[int64]string{}
		if l.FS != nil {
			entries, err := fs.ReadDir(l.FS, ".")
			if err != nil {
				continue // the migrator reports it
			}
			for _, e := range entries {
				m := sqlFileName.FindStringSubmatch(e.Name())
				if e.IsDir() || m == nil {
					continue
				}
				if n, err := strconv.ParseInt(m[1], 10, 32); err == nil {
					have[n] = path.Base(e.Name())
				}
			}
		}
		for _, g := range l.Funcs {
			have[int64(g.Version)] = fmt.Sprintf("%03d_%s.go", g.Version, g.Name)
		}
		highest := int64(0)
		for n := range have {
			highest = max(highest, n)
		}
		for n := int64(1); n < highest; n++ {
			if _, ok := have[n]; ok {
				continue
			}
			next := n + 1
			for ; have[next] == ""; next++ {
			}
			if !custom {
				return fmt.Errorf("lane %q: missing migration %d (the folder goes on with %s): it is probably a Go migration, which this stock lanes binary cannot run; build a binary of your own with the package github.com/multilanes/lanes/lanescli, registering the lane's Go migrations in lanescli.Config.Funcs",
					l.Name, n, have[next])
			}
			return fmt.Errorf("lane %q: missing migration %d (the lane goes on with %s): neither a file of the folder nor a Go migration registered in this binary has that number",
				l.Name, n, have[next])
		}
	}
	return nil
}

func laneNames(lanes []migrator.Lane) string {
	if len(lanes) == 0 {
		return "none"
	}
	names := make([]string, len(lanes))
	for i, l := range lanes {
		names[i] = l.Name
	}
	return strings.Join(names, ", ")
}

// parseLaneDecls parses a comma-separated list of name:mode[:version_table] entries, such as
// "fast:blocking,slow:background,reports:background:ops.reports_version". The mode may be
// omitted for the default names (fast is blocking, slow background). An empty string returns
// nil.
func parseLaneDecls(s string) ([]migrator.LaneDecl, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []migrator.LaneDecl
	for _, part := range strings.Split(s, ",") {
		name, mode, hasMode := strings.Cut(strings.TrimSpace(part), ":")
		mode, table, _ := strings.Cut(mode, ":")
		d := migrator.LaneDecl{Name: name, VersionTable: table}
		switch {
		case hasMode:
			m, err := migrator.ParseMode(mode)
			if err != nil {
				return nil, fmt.Errorf("lane %q: %w", name, err)
			}
			d.Mode = m
		case name == "fast":
			d.Mode = migrator.Blocking
		case name == "slow":
			d.Mode = migrator.Background
		default:
			return nil, fmt.Errorf("lane %q: give its mode as %s:blocking or %s:background", name, name, name)
		}
		if !wire.LaneName.MatchString(d.Name) {
			return nil, fmt.Errorf("invalid lane name %q: use lower-case letters, digits and underscores, starting with a letter", d.Name)
		}
		out = append(out, d)
	}
	return out, nil
}
