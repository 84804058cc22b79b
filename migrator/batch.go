package migrator

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Backfill makes a Go migration a batched walk: the Migrator calls the function once per batch,
// each call in its own transaction that also commits the walk's cursor and counters, so a
// walk interrupted at any moment (a kill, a restart, a takeover) resumes after the last
// committed batch and no batch is applied twice. Set exactly one of Range and Cursor.
//
// The lane's version is bumped, its history row written and its completion announced once the
// last batch has committed.
type Backfill struct {
	// Table and Key name what a Range walk covers: Table (optionally schema-qualified) and Key,
	// an integer column (int2, int4 or int8) with a unique index. Required with Range.
	Table, Key string
	// Size is the starting batch size in rows (keys for Range, the size argument for Cursor).
	// The Migrator then adapts it toward Config.Batch.Target. Default: 1000.
	Size int
	// Range processes the keys in (lo, hi] inside tx. hi is the key of the Size-th row after lo
	// (a keyset walk: sparse keys still give full batches). The walk's upper end is frozen when
	// the migration first starts (the key's maximum then): rows inserted later are not visited.
	Range func(ctx context.Context, tx pgx.Tx, lo, hi int64) error
	// Cursor processes up to size items after cursor ("" on the first call) inside tx and
	// returns the cursor to continue from and whether the walk is done. The cursor is opaque
	// text stored with the walk's progress. For walks that are not integer ranges. Progress
	// counts each batch as size items.
	Cursor func(ctx context.Context, tx pgx.Tx, cursor string, size int) (next string, done bool, err error)
	// Total, optional with Cursor, estimates how many items the walk covers. It is read once,
	// when the walk first starts (a resumed walk keeps it), so that progress has a percent and
	// an ETA; a Cursor walk without it shows items done and a rate only.
	Total func(ctx context.Context, q Querier) (int64, error)
}

// BatchConfig tunes batched migrations (files with a `---- lanes: batch ... ----` directive and
// Go migrations with a Backfill). The zero value is valid: every field has a default.
type BatchConfig struct {
	// Target is the duration a batch should take. The batch size moves toward it: the time per
	// row is smoothed over recent batches (exponential moving average, weight 0.4), the size
	// grows by at most 1.2x per batch, and is cut tenfold at once after a batch that took more
	// than five times the target; it never falls below a tenth of the starting size (smaller
	// batches do not get shorter once their fixed cost exceeds the target). Default: 200ms.
	Target time.Duration
	// Pause is a sleep between batches. Default: 0.
	Pause time.Duration
	// NiceRatio adds a sleep of NiceRatio times the last batch's duration between batches
	// (gh-ost's nice-ratio): the added load falls by itself when the database slows down.
	// Default: 0.
	NiceRatio float64
	// MaxReplicationLag holds the next batch back while a standby's replay lag, read from
	// pg_stat_replication, exceeds it. A lag that cannot be read (a role without pg_monitor)
	// is reported as unknown in the progress and the log, and does not hold batches back.
	// Negative disables the check. Default: 30s.
	MaxReplicationLag time.Duration
	// StatementTimeout bounds each batch's statements (statement_timeout, set per batch).
	// A batch that times out is retried with a tenth of its size, twice, before the migration
	// fails naming the batch's range. Default: the larger of 50 times Target and 10s.
	StatementTimeout time.Duration
	// LockTimeout bounds each lock wait of a batch (lock_timeout, set per batch). A batch that
	// hits it is retried after a pause as long as the last batch, smaller, three times, then the
	// migration stops with a transient error and is resumed later. Default: the larger of
	// Target and 100ms.
	LockTimeout time.Duration
}

func (c *BatchConfig) setDefaults() {
	if c.Target <= 0 {
		c.Target = 200 * time.Millisecond
	}
	if c.MaxReplicationLag == 0 {
		c.MaxReplicationLag = 30 * time.Second
	}
	if c.StatementTimeout <= 0 {
		c.StatementTimeout = max(50*c.Target, 10*time.Second)
	}
	if c.LockTimeout <= 0 {
		c.LockTimeout = max(c.Target, 100*time.Millisecond)
	}
	if c.NiceRatio < 0 {
		c.NiceRatio = 0
	}
}

// batchSpec is a batched migration as loaded: the SQL directive's options or a Go Backfill.
type batchSpec struct {
	table tableName
	key   string
	size  int
	sql   string    // the file's one statement, with $1 and $2; empty for a Go migration
	stmt  statement // sql with its line in the file

	rangeFn  func(ctx context.Context, tx pgx.Tx, lo, hi int64) error
	cursorFn func(ctx context.Context, tx pgx.Tx, cursor string, size int) (string, bool, error)
	totalFn  func(ctx context.Context, q Querier) (int64, error)
}

// keyed reports whether the walk is a keyset walk over an integer key (SQL files and Range).
func (b *batchSpec) keyed() bool { return b.cursorFn == nil }

const defaultBatchSize = 1000

var (
	directiveLine  = regexp.MustCompile(`(?m)^[ \t]*---- lanes:(.*)$`)
	directiveShape = regexp.MustCompile(`\A\s*---- lanes:\s*(.*?)\s*----\s*\z`)
	param1         = regexp.MustCompile(`\$1\b`)
	param2         = regexp.MustCompile(`\$2\b`)
)

// parseBatchDirective reads a `---- lanes: batch table=T key=K size=N ----` directive from the
// first line of a file's rendered up SQL. It returns nil when the file has none, and an error
// for a malformed directive, one that is not on the first line, a file that is also
// disable-tx, or a file whose statements are not exactly one using $1 and $2.
func parseBatchDirective(mig *Migration) (*batchSpec, error) {
	locs := directiveLine.FindAllStringIndex(mig.SQL, -1)
	if len(locs) == 0 {
		return nil, nil
	}
	if len(locs) > 1 {
		return nil, errors.New("more than one `---- lanes: ... ----` directive")
	}
	if strings.TrimSpace(mig.SQL[:locs[0][0]]) != "" {
		return nil, errors.New("the `---- lanes: batch ... ----` directive must be the file's first line")
	}
	line := mig.SQL[locs[0][0]:locs[0][1]]
	m := directiveShape.FindStringSubmatch(line)
	if m == nil {
		return nil, fmt.Errorf("malformed directive %q: want ---- lanes: batch table=NAME key=COLUMN [size=N] ----", strings.TrimSpace(line))
	}
	fields := strings.Fields(m[1])
	if len(fields) == 0 || fields[0] != "batch" {
		return nil, fmt.Errorf("unknown directive %q: the only one is ---- lanes: batch table=NAME key=COLUMN [size=N] ----", strings.TrimSpace(line))
	}
	b := &batchSpec{size: defaultBatchSize}
	seen := map[string]bool{}
	var table string
	for _, f := range fields[1:] {
		k, v, ok := strings.Cut(f, "=")
		if !ok || v == "" {
			return nil, fmt.Errorf("batch directive: %q is not option=value", f)
		}
		if seen[k] {
			return nil, fmt.Errorf("batch directive: option %q given twice", k)
		}
		seen[k] = true
		switch k {
		case "table":
			table = v
		case "key":
			b.key = v
		case "size":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return nil, fmt.Errorf("batch directive: size=%s: want a positive number of rows", v)
			}
			b.size = n
		default:
			return nil, fmt.Errorf("batch directive: unknown option %q (options: table, key, size)", k)
		}
	}
	if table == "" {
		return nil, errors.New("batch directive: missing table=NAME")
	}
	if b.key == "" {
		return nil, errors.New("batch directive: missing key=COLUMN")
	}
	t, err := parseTableName(table)
	if err != nil {
		return nil, fmt.Errorf("batch directive: %w", err)
	}
	b.table = t
	if mig.DisableTx {
		return nil, errors.New("a batched file cannot also be disable-tx: each batch runs in its own transaction")
	}
	if len(mig.statements) != 1 {
		return nil, fmt.Errorf("a batched file holds exactly one statement, run once per key range ($1, $2]; this one has %d", len(mig.statements))
	}
	rest := mig.SQL[locs[0][1]:]
	st := strings.TrimSpace(rest) // the statement, without the directive
	off := locs[0][1] + len(rest) - len(strings.TrimLeft(rest, " \t\r\n"))
	b.stmt = statement{SQL: st, Line: 1 + strings.Count(mig.SQL[:off], "\n"), Offset: off}
	if !param1.MatchString(st) || !param2.MatchString(st) {
		return nil, errors.New("the batched statement must use $1 (the range's exclusive lower end) and $2 (its inclusive upper end), as in: where id > $1 and id <= $2")
	}
	b.sql = st
	return b, nil
}

// goBatchSpec validates a Go migration's Backfill.
func goBatchSpec(bf *Backfill) (*batchSpec, error) {
	b := &batchSpec{size: bf.Size, key: bf.Key, rangeFn: bf.Range, cursorFn: bf.Cursor, totalFn: bf.Total}
	if b.size <= 0 {
		b.size = defaultBatchSize
	}
	switch {
	case bf.Range != nil && bf.Cursor != nil:
		return nil, errors.New("backfill: set Range or Cursor, not both")
	case bf.Range == nil && bf.Cursor == nil:
		return nil, errors.New("backfill: set Range or Cursor")
	case bf.Range != nil && bf.Total != nil:
		return nil, errors.New("backfill: Total is for Cursor walks (a Range walk estimates its rows from the table)")
	case bf.Range != nil:
		if bf.Table == "" || bf.Key == "" {
			return nil, errors.New("backfill: Range needs Table and Key")
		}
		t, err := parseTableName(bf.Table)
		if err != nil {
			return nil, fmt.Errorf("backfill: %w", err)
		}
		b.table = t
	}
	return b, nil
}

// sizer moves the batch size toward a target duration.
type sizer struct {
	size     int
	target   time.Duration
	perRow   float64 // smoothed seconds per row; 0 until the first batch
	min, max int
}

// newSizer starts at start rows. The size it learns never falls below a tenth of start: when
// a batch's fixed cost (round trips, the commit's flush) alone exceeds the target, as on a
// loaded server, smaller batches would not be shorter, only more numerous.
func newSizer(start int, target time.Duration) *sizer {
	return &sizer{size: start, target: target, min: max(1, start/10), max: 1_000_000}
}

// resumeSizer continues a walk whose last batch size was stored: from that size, with the floor
// of the configured start (a walk that once shrank, on a loaded server or after a timeout, must
// not keep a floor of a tenth of its smallest size across restarts).
func resumeSizer(start, stored int, target time.Duration) *sizer {
	s := newSizer(start, target)
	s.size = max(s.min, min(stored, s.max))
	return s
}

// observe records a batch of rows that took d and sets the next size.
func (s *sizer) observe(rows int, d time.Duration) {
	if rows <= 0 {
		return
	}
	if d > 5*s.target {
		// Far over: cut at once, and restart the average from this batch.
		s.size = max(s.min, s.size/10)
		s.perRow = d.Seconds() / float64(rows)
		return
	}
	per := d.Seconds() / float64(rows)
	if s.perRow == 0 {
		s.perRow = per
	} else {
		s.perRow = 0.4*per + 0.6*s.perRow
	}
	want := s.size
	if s.perRow > 0 {
		want = int(s.target.Seconds() / s.perRow)
	}
	if rows < s.size {
		// The batch was short of keys (the end of the walk): do not learn growth from it.
		want = min(want, s.size)
	}
	if d > s.target {
		// Over the target: never grow, and shrink in proportion at once (the average lags).
		want = min(want, int(float64(s.size)*s.target.Seconds()/d.Seconds()))
	}
	grow := int(float64(s.size)*1.2) + 1
	s.size = max(s.min, min(want, grow, s.max))
}

// shrink cuts the size after a batch that timed out.
// shrink cuts the size tenfold after a batch that timed out, down to one row (below the floor
// of observe: a timed-out range is narrowed until it passes or is named).
func (s *sizer) shrink() { s.size = max(1, s.size/10) }
