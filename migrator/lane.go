package migrator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing/fstest"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/tern/v2/migrate"

	"github.com/multilanes/lanes/internal/wire"
)

// Mode says when a lane is applied.
type Mode int

const (
	// Blocking lanes are applied before a replica reports ready.
	Blocking Mode = iota
	// Background lanes are applied after start-up, by one replica at a time.
	Background
)

// String returns "blocking" or "background".
func (m Mode) String() string {
	switch m {
	case Blocking:
		return "blocking"
	case Background:
		return "background"
	}
	return "mode(" + strconv.Itoa(int(m)) + ")"
}

// ParseMode parses "blocking" or "background".
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "blocking", "fast":
		return Blocking, nil
	case "background", "slow":
		return Background, nil
	}
	return 0, fmt.Errorf("unknown lane mode %q (want blocking or background)", s)
}

// TxFunc is the body of a transactional Go migration. tx is the migration's transaction: the
// Migrator commits it together with the version bump and the history row, or rolls it back when
// the function returns an error. A nested tx.Begin (or pgx.BeginFunc(ctx, tx, ...)) is a
// savepoint, never a second transaction. The function must not end tx itself (no Commit or
// Rollback of tx, no COMMIT through tx.Conn()): the Migrator then refuses to record the version.
type TxFunc func(ctx context.Context, tx pgx.Tx) error

// ConnFunc is the body of a Go migration that must run outside a transaction (as a
// `---- tern: disable-tx ----` file does, for CREATE INDEX CONCURRENTLY and the like). It gets
// the Migrator's dedicated connection, outside any transaction, and must leave it that way.
type ConnFunc func(ctx context.Context, conn *pgx.Conn) error

// GoMigration is a migration written in Go, registered on one lane of one Migrator (there is no
// global registry). It takes the place of the file with the same version number. Exactly one of
// Up and UpNoTx is set.
//
// Its checksum, recorded in the history table and compared on every later run (see
// Config.AllowDrift), covers its file-like name "NNN_name.go" and Revision: the Migrator cannot
// read a function's code, so bump Revision whenever the code of an applied migration changes
// meaning, and a database that ran the old code is reported as drifted.
type GoMigration struct {
	// Version is the migration's number in its lane, counted with the lane's files: numbers run
	// from 1 without gaps across files and Go migrations together.
	Version int32
	// Name is a short title such as "load_example"; it is shown as "NNN_name.go".
	Name string
	// Revision identifies the version of the code, such as "2" or a date; the author changes it
	// when the code changes. Default "": the checksum is then the one of earlier releases,
	// which covered the name only.
	Revision string
	// Up applies the migration inside the migration's transaction (commit and rollback are the
	// Migrator's). It must honour ctx.
	Up TxFunc
	// UpNoTx applies the migration outside a transaction, like a `---- tern: disable-tx ----`
	// file; a short transaction then records it. A failure leaves whatever UpNoTx did, so it must
	// be safe to run again. It must honour ctx.
	UpNoTx ConnFunc
	// Backfill, when set, makes the migration a batched walk in place of Up (leave Up and UpNoTx
	// nil): each batch in its own transaction, resumable after any interruption.
	Backfill *Backfill
}

// checksum returns the hex SHA-256 identifying the Go migration named name (NNN_name.go).
func (g GoMigration) checksum(name string) string {
	s := "go:" + name
	if g.Revision != "" {
		s += "\x00revision:" + g.Revision
	}
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// Lane describes one lane: a folder of tern-format migration files plus optional Go
// migrations, applied against the lane's own version table.
type Lane struct {
	// Name identifies the lane: lower-case letters, digits and underscores, starting with a
	// letter, at most 40 bytes.
	Name string
	// Mode is Blocking or Background.
	Mode Mode
	// VersionTable is the tern-format version table of the lane, optionally schema-qualified
	// ("schema.table"). Default: "lanes_<name>_version". Each part is quoted as an identifier.
	// Each session resolves the name to one schema-qualified table (see Migrator.Migrate) and
	// the lane's lock key is derived from that, so "t" and "public.t" are one table and one lock;
	// two lanes resolving to the same table are refused.
	VersionTable string
	// FS holds the lane's files at its root: NNN_title.sql numbered from 1 with no gaps, and
	// shared templates in subfolders, exactly as tern reads a folder. Nil when the lane has only
	// Go migrations.
	FS fs.FS
	// Funcs are Go migrations registered on this lane.
	Funcs []GoMigration
	// Data is passed to the templates of the lane's files (tern's Migrator.Data).
	Data map[string]any
}

// Migration is one loaded, rendered migration of a lane.
type Migration struct {
	// Lane is the name of the lane the migration belongs to.
	Lane string
	// Version is the lane version the database has once the migration is applied.
	Version int32
	// Name is the file name ("003_add_index.sql"), or "NNN_name.go" for a Go migration.
	Name string
	// SQL is the rendered up SQL of a file migration; empty for a Go migration.
	SQL string
	// Func is the function of a transactional Go migration (GoMigration.Up); nil otherwise.
	Func TxFunc
	// FuncNoTx is the function of a Go migration registered with UpNoTx; nil otherwise.
	FuncNoTx ConnFunc
	// DisableTx is true for files holding `---- tern: disable-tx ----` and Go migrations
	// registered with UpNoTx.
	DisableTx bool
	// Checksum is the hex SHA-256 of the rendered SQL; for a Go migration, of its name and
	// Revision (see GoMigration).
	Checksum string

	statements []statement
	lineOffset int        // lines trimmed from the top of the file before the up SQL
	batch      *batchSpec // a batched migration: SQL directive or Go Backfill
}

// Batched reports whether the migration runs in batches (a `---- lanes: batch ... ----` file
// or a Go migration with a Backfill).
func (m *Migration) Batched() bool { return m.batch != nil }

var (
	laneNamePattern = wire.LaneName
	fileNamePattern = regexp.MustCompile(`\A(\d+)_(.+)\.sql\z`)
	disableTxMarker = regexp.MustCompile(`(?m)^---- tern: disable-tx ----$`)
	goNamePattern   = regexp.MustCompile(`\A[A-Za-z0-9_]+\z`)
)

const upDownSeparator = "---- create above / drop below ----"

// loadedLane is a validated lane with its migrations, ready to apply.
type loadedLane struct {
	Lane
	index      int       // position in the Migrator's lanes
	table      tableName // as configured; Migrate works on a copy holding the resolved name
	migrations []*Migration
	lock       *laneLock // on the copy Migrate works on, once it holds the lane's lock
}

func (l *loadedLane) latest() int32 { return int32(len(l.migrations)) }

// onlyHiddenFiles reports whether fsys's root holds nothing but hidden files, such as the
// .gitkeep that keeps an empty folder in git.
func onlyHiddenFiles(fsys fs.FS) bool {
	entries, err := fs.ReadDir(fsys, ".")
	if err != nil {
		return false
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".") {
			return false
		}
	}
	return true
}

// loadLane validates spec and loads its migrations. It touches no database.
func loadLane(spec Lane) (*loadedLane, error) {
	if !laneNamePattern.MatchString(spec.Name) {
		return nil, &LoadError{Lane: spec.Name, Err: fmt.Errorf("invalid lane name %q: use lower-case letters, digits and underscores, starting with a letter, at most 40 bytes", spec.Name)}
	}
	if spec.Mode != Blocking && spec.Mode != Background {
		return nil, &LoadError{Lane: spec.Name, Err: fmt.Errorf("invalid mode %d", spec.Mode)}
	}
	if spec.VersionTable == "" {
		spec.VersionTable = "lanes_" + spec.Name + "_version"
	}
	table, err := parseTableName(spec.VersionTable)
	if err != nil {
		return nil, &LoadError{Lane: spec.Name, Err: err}
	}
	l := &loadedLane{Lane: spec, table: table}

	// Collect the versions of files and Go migrations, reporting bad names, duplicates,
	// version 0 and gaps ourselves: tern ignores bad names and panics on version 0.
	owner := map[int32]string{}
	files := map[int32]string{}
	if spec.FS != nil {
		entries, err := fs.ReadDir(spec.FS, ".")
		if err != nil {
			return nil, &LoadError{Lane: spec.Name, Err: fmt.Errorf("read folder: %w", err)}
		}
		for _, e := range entries {
			if e.IsDir() || path.Ext(e.Name()) != ".sql" {
				continue
			}
			m := fileNamePattern.FindStringSubmatch(e.Name())
			if m == nil {
				return nil, &LoadError{Lane: spec.Name, File: e.Name(), Err: errors.New("migration files must be named NNN_title.sql")}
			}
			n, err := strconv.ParseInt(m[1], 10, 32)
			if err != nil || n < 1 {
				return nil, &LoadError{Lane: spec.Name, File: e.Name(), Err: errors.New("migration numbers start at 1 and fit in int32")}
			}
			v := int32(n)
			if prev, ok := owner[v]; ok {
				return nil, &LoadError{Lane: spec.Name, File: e.Name(), Err: fmt.Errorf("duplicate migration %d (also %s)", v, prev)}
			}
			owner[v], files[v] = e.Name(), e.Name()
			// tern reports a file without SQL above the separator without naming it: check here.
			raw, err := fs.ReadFile(spec.FS, e.Name())
			if err != nil {
				return nil, &LoadError{Lane: spec.Name, File: e.Name(), Err: err}
			}
			up, _, _ := strings.Cut(string(raw), upDownSeparator)
			if onlyComments(up) {
				return nil, &LoadError{Lane: spec.Name, File: e.Name(), Err: errors.New("no SQL statement above the down separator")}
			}
		}
	}
	funcs := map[int32]GoMigration{}
	for _, g := range spec.Funcs {
		name := fmt.Sprintf("%03d_%s.go", g.Version, g.Name)
		switch {
		case g.Version < 1:
			return nil, &LoadError{Lane: spec.Name, File: name, Err: errors.New("migration numbers start at 1")}
		case !goNamePattern.MatchString(g.Name):
			return nil, &LoadError{Lane: spec.Name, File: name, Err: errors.New("go migration names use letters, digits and underscores")}
		case g.Up == nil && g.UpNoTx == nil && g.Backfill == nil:
			return nil, &LoadError{Lane: spec.Name, File: name, Err: errors.New("go migration has no Up function (set Up, or UpNoTx to run outside a transaction, or Backfill)")}
		case g.Up != nil && g.UpNoTx != nil:
			return nil, &LoadError{Lane: spec.Name, File: name, Err: errors.New("go migration sets both Up and UpNoTx: set one")}
		case g.Backfill != nil && (g.Up != nil || g.UpNoTx != nil):
			return nil, &LoadError{Lane: spec.Name, File: name, Err: errors.New("go migration has both Up and Backfill: set one")}
		}
		if prev, ok := owner[g.Version]; ok {
			return nil, &LoadError{Lane: spec.Name, File: name, Err: fmt.Errorf("duplicate migration %d (also %s)", g.Version, prev)}
		}
		owner[g.Version], funcs[g.Version] = name, g
	}
	if len(owner) == 0 {
		// A folder kept in git by a .gitkeep (hidden files only) is an empty lane: done at
		// version 0. A folder with other files but no migration is more likely a mistake.
		if spec.FS == nil || !onlyHiddenFiles(spec.FS) {
			return nil, &LoadError{Lane: spec.Name, Err: errors.New("lane has no migrations (a lane kept empty on purpose holds only a .gitkeep)")}
		}
		return l, nil
	}
	versions := make([]int32, 0, len(owner))
	for v := range owner {
		versions = append(versions, v)
	}
	slices.Sort(versions)
	for i, v := range versions {
		if v != int32(i+1) {
			return nil, &LoadError{Lane: spec.Name, File: owner[v], Err: fmt.Errorf("missing migration %d: numbers run from 1 without gaps", i+1)}
		}
	}

	rendered, err := renderFiles(spec, files, funcs)
	if err != nil {
		return nil, err
	}
	for _, v := range versions {
		if g, ok := funcs[v]; ok {
			gm := &Migration{Lane: spec.Name, Version: v, Name: owner[v],
				Func: g.Up, FuncNoTx: g.UpNoTx, DisableTx: g.UpNoTx != nil, Checksum: g.checksum(owner[v])}
			if g.Backfill != nil {
				if gm.batch, err = goBatchSpec(g.Backfill); err != nil {
					return nil, &LoadError{Lane: spec.Name, File: owner[v], Err: err}
				}
			}
			l.migrations = append(l.migrations, gm)
			continue
		}
		mig := rendered[v]
		if !utf8.ValidString(mig.SQL) {
			return nil, &LoadError{Lane: spec.Name, File: mig.Name, Err: errors.New("file is not valid UTF-8")}
		}
		mig.statements = splitStatements(mig.SQL)
		if len(mig.statements) == 0 {
			return nil, &LoadError{Lane: spec.Name, File: mig.Name, Err: errors.New("no SQL statement above the down separator")}
		}
		if mig.batch, err = parseBatchDirective(mig); err != nil {
			return nil, &LoadError{Lane: spec.Name, File: mig.Name, Err: err}
		}
		l.migrations = append(l.migrations, mig)
	}
	return l, nil
}

// renderFiles renders the lane's files with tern's loader, so templates, shared templates in
// subfolders and the up/down separator behave exactly as in tern. Go migrations take their
// place in the sequence through placeholder files that tern never executes.
func renderFiles(spec Lane, files map[int32]string, funcs map[int32]GoMigration) (map[int32]*Migration, error) {
	out := map[int32]*Migration{}
	if len(files) == 0 {
		return out, nil
	}
	fsys := spec.FS
	if len(funcs) > 0 {
		overlay := overlayFS{base: spec.FS, extra: fstest.MapFS{}}
		for v, g := range funcs {
			overlay.extra[fmt.Sprintf("%d_%s.sql", v, g.Name)] = &fstest.MapFile{Data: []byte("select 1 -- placeholder for a go migration")}
		}
		fsys = overlay
	}
	tm, err := migrate.NewMigrator(context.Background(), nil, spec.VersionTable)
	if err != nil {
		return nil, &LoadError{Lane: spec.Name, Err: err}
	}
	for k, v := range spec.Data {
		tm.Data[k] = v
	}
	if err := tm.LoadMigrations(fsys); err != nil {
		le := &LoadError{Lane: spec.Name, Err: err}
		// tern names the file in template errors as "NNN_title.sql up"; lift it out.
		for _, name := range files {
			if strings.Contains(err.Error(), name) {
				le.File = name
			}
		}
		return nil, le
	}
	for _, tmig := range tm.Migrations {
		name, ok := files[tmig.Sequence]
		if !ok {
			continue
		}
		raw, err := fs.ReadFile(spec.FS, name)
		if err != nil {
			return nil, &LoadError{Lane: spec.Name, File: name, Err: err}
		}
		up, _, _ := strings.Cut(string(raw), upDownSeparator)
		if strings.Contains(tmig.UpSQL, "<no value>") && !strings.Contains(up, "<no value>") {
			return nil, &LoadError{Lane: spec.Name, File: name, Err: errors.New("template uses a value missing from the lane's Data (rendered as <no value>)")}
		}
		lead := len(up) - len(strings.TrimLeft(up, " \t\r\n"))
		sum := sha256.Sum256([]byte(tmig.UpSQL))
		out[tmig.Sequence] = &Migration{
			Lane:       spec.Name,
			Version:    tmig.Sequence,
			Name:       name,
			SQL:        tmig.UpSQL,
			DisableTx:  disableTxMarker.MatchString(tmig.UpSQL),
			Checksum:   hex.EncodeToString(sum[:]),
			lineOffset: strings.Count(up[:lead], "\n"),
		}
	}
	return out, nil
}

// overlayFS adds files to the root of a base file system.
type overlayFS struct {
	base  fs.FS
	extra fstest.MapFS
}

func (o overlayFS) Open(name string) (fs.File, error) {
	if name == "." {
		return o, nil
	}
	if _, ok := o.extra[name]; ok {
		return o.extra.Open(name)
	}
	if o.base == nil {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	return o.base.Open(name)
}

func (o overlayFS) ReadDir(name string) ([]fs.DirEntry, error) {
	var entries []fs.DirEntry
	if o.base != nil {
		base, err := fs.ReadDir(o.base, name)
		if err != nil && (name != "." || !errors.Is(err, fs.ErrNotExist)) {
			return nil, err
		}
		entries = base
	}
	if name == "." {
		extra, err := fs.ReadDir(o.extra, ".")
		if err != nil {
			return nil, err
		}
		entries = append(entries, extra...)
		slices.SortFunc(entries, func(a, b fs.DirEntry) int { return strings.Compare(a.Name(), b.Name()) })
	}
	return entries, nil
}

// The root of an overlayFS is a directory; these make it an fs.File and fs.ReadDirFile.
func (o overlayFS) Stat() (fs.FileInfo, error) { return fs.Stat(o.extra, ".") }
func (o overlayFS) Read([]byte) (int, error)   { return 0, errors.New("is a directory") }
func (o overlayFS) Close() error               { return nil }
