package migrator

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// tableName is a possibly schema-qualified table name.
type tableName struct {
	Schema string // empty: the first schema of search_path
	Name   string
}

// parseTableName splits "schema.table" or "table". Names are taken verbatim (not lower-cased)
// and quoted when used, so pick lower-case names to stay compatible with tern's CLI, which
// does not quote.
func parseTableName(s string) (tableName, error) {
	parts := strings.Split(s, ".")
	if len(parts) > 2 {
		return tableName{}, fmt.Errorf("invalid table name %q: use table or schema.table", s)
	}
	for _, p := range parts {
		if p == "" || len(p) > 63 || strings.ContainsRune(p, 0) {
			return tableName{}, fmt.Errorf("invalid table name %q: each part must be 1 to 63 bytes", s)
		}
	}
	if len(parts) == 2 {
		return tableName{Schema: parts[0], Name: parts[1]}, nil
	}
	return tableName{Name: parts[0]}, nil
}

// String returns the name as configured.
func (t tableName) String() string {
	if t.Schema == "" {
		return t.Name
	}
	return t.Schema + "." + t.Name
}

// Quoted returns the name quoted for SQL.
func (t tableName) Quoted() string {
	if t.Schema == "" {
		return pgx.Identifier{t.Name}.Sanitize()
	}
	return pgx.Identifier{t.Schema, t.Name}.Sanitize()
}

// lockKey derives an advisory lock key from the table name as written: "multi-lanes:" and the
// name, hashed. A lane's lock uses the key of its resolved, schema-qualified version table (see
// resolveTables), so two lanes share a lock only when they share a version table, however it is
// spelt. The key differs from tern's constant lock number, so a lane never waits for tern's lock,
// nor tern for a lane's.
func (t tableName) lockKey() int64 {
	h := fnv.New64a()
	h.Write([]byte("multi-lanes:" + t.String()))
	return int64(h.Sum64())
}

// resolvedTable is a lane's version table as one session sees it.
type resolvedTable struct {
	table  tableName // schema-qualified; Schema is "" only when the session has no schema to create it in
	exists bool
}

// resolveTables resolves every lane's version table for the session q, in one query: a table
// found through the session's search_path (or its explicit schema) is qualified with the schema
// it was found in; a missing one with its explicit schema, or the session's current_schema(),
// where an unqualified CREATE TABLE would put it. Reading, creating, locking and writing then all
// use this one qualified name, so a search_path that names several schemas (a role with a schema
// of its own name, options=-c search_path=...) cannot make the Migrator read one table and
// create or write another. Two lanes resolving to the same table are an error. historyExists
// tells whether the history table is found.
func (m *Migrator) resolveTables(ctx context.Context, q Querier) (tables []resolvedTable, historyExists bool, err error) {
	names := make([]string, len(m.lanes))
	schemas := make([]string, len(m.lanes))
	for i, l := range m.lanes {
		names[i], schemas[i] = l.table.Quoted(), l.table.Schema
	}
	rows, err := q.Query(ctx, `select coalesce(n.nspname, nullif(u.s, ''), current_schema(), ''), c.oid is not null, to_regclass($3) is not null
from unnest($1::text[], $2::text[]) with ordinality u(t, s, i)
left join pg_class c on c.oid = to_regclass(u.t)
left join pg_namespace n on n.oid = c.relnamespace
order by u.i`, names, schemas, m.history.Quoted())
	if err != nil {
		return nil, false, fmt.Errorf("resolve version tables: %w", err)
	}
	out := make([]resolvedTable, 0, len(m.lanes))
	for rows.Next() {
		var r resolvedTable
		if err := rows.Scan(&r.table.Schema, &r.exists, &historyExists); err != nil {
			rows.Close()
			return nil, false, fmt.Errorf("resolve version tables: %w", err)
		}
		r.table.Name = m.lanes[len(out)].table.Name
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, false, fmt.Errorf("resolve version tables: %w", err)
	}
	if len(out) != len(m.lanes) {
		return nil, false, fmt.Errorf("resolve version tables: got %d rows for %d lanes", len(out), len(m.lanes))
	}
	seen := map[tableName]int{}
	for i, r := range out {
		if r.table.Schema == "" {
			continue // reported by the lane that needs to create it
		}
		if j, dup := seen[r.table]; dup {
			return nil, false, fmt.Errorf("lanes %q and %q use the same version table %s (configured as %q and %q): give each lane its own version table",
				m.lanes[j].Name, m.lanes[i].Name, r.table, m.lanes[j].table, m.lanes[i].table)
		}
		seen[r.table] = i
	}
	return out, historyExists, nil
}

// lockKeys returns the advisory lock keys of a lane whose version table resolved to r: the key
// of the qualified name, then the key of the name as configured when it differs (the only key of
// releases before version tables were resolved), so that a replica of such a release and one of
// this release never apply a lane at the same time.
func (l *loadedLane) lockKeys(r resolvedTable) []int64 {
	keys := []int64{r.table.lockKey()}
	if legacy := l.table.lockKey(); legacy != keys[0] {
		keys = append(keys, legacy)
	}
	return keys
}

// setupLockKey serialises creating the shared history table across lanes and processes.
var setupLockKey = func() int64 {
	h := fnv.New64a()
	h.Write([]byte("multi-lanes:setup"))
	return int64(h.Sum64())
}()

// ensureVersionTable creates the lane's version table in tern's format (one row, version int4
// not null primary key, starting at 0) when it does not exist. t is the resolved, qualified
// name. The caller holds the lane lock.
//
// A missing version table is not taken for version 0 when the history table records migrations
// of the lane as applied (the table was dropped, or the session resolves it to another schema):
// that returns an error naming both tables, and nothing is created.
func ensureVersionTable(ctx context.Context, conn *pgx.Conn, lane string, t, history tableName) error {
	if t.Schema == "" {
		return fmt.Errorf("create version table %s: the session's search_path names no existing schema to create it in (set search_path, or give the version table as schema.table)", t.Name)
	}
	var exists bool
	var applied *int32
	err := conn.QueryRow(ctx, `select to_regclass($1) is not null, (select max(version) from `+history.Quoted()+` where lane = $2 and error is null)`,
		t.Quoted(), lane).Scan(&exists, &applied)
	if err != nil {
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "42P01" { // no history table: nothing recorded
			return fmt.Errorf("look up version table %s: %w", t, err)
		}
		err = conn.QueryRow(ctx, "select to_regclass($1) is not null", t.Quoted()).Scan(&exists)
		if err != nil {
			return fmt.Errorf("look up version table %s: %w", t, err)
		}
	}
	if exists {
		return nil
	}
	if applied != nil && *applied > 0 {
		return fmt.Errorf("version table %s does not exist, but history table %s records version %d of lane %q as applied: refusing to apply the lane again from version 1 (restore the version table, for example create it holding version %d, or point the lane at the table it used)",
			t, history, *applied, lane, *applied)
	}
	q := t.Quoted()
	_, err = conn.Exec(ctx, fmt.Sprintf(`create table if not exists %s(version int4 not null primary key);
insert into %s(version) select 0 where not exists (select 1 from %s)`, q, q, q))
	if err != nil {
		return fmt.Errorf("create version table %s: %w", t, err)
	}
	return nil
}

// ensureHistoryTable creates the history table shared by all lanes when it does not exist.
// Lanes run concurrently on different connections, so creation is serialised with a
// transaction-level advisory lock held only for the few milliseconds of the DDL.
func ensureHistoryTable(ctx context.Context, conn *pgx.Conn, t tableName) error {
	var exists bool
	if err := conn.QueryRow(ctx, "select to_regclass($1) is not null", t.Quoted()).Scan(&exists); err != nil {
		return fmt.Errorf("look up history table %s: %w", t, err)
	}
	if exists {
		return nil
	}
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "select pg_advisory_xact_lock($1)", setupLockKey); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, fmt.Sprintf(`create table if not exists %s (
  id bigint generated always as identity primary key,
  lane text not null,
  version int4 not null,
  name text not null,
  checksum text not null,
  started_at timestamptz not null,
  finished_at timestamptz not null,
  duration interval generated always as (finished_at - started_at) stored,
  host text not null,
  pid int4 not null,
  application_name text not null,
  error text,
  sqlstate text,
  statement text
)`, t.Quoted()))
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, fmt.Sprintf("create index if not exists %s on %s (lane, id)",
			pgx.Identifier{t.Name + "_lane_idx"}.Sanitize(), t.Quoted()))
		return err
	})
	if err != nil {
		return fmt.Errorf("create history table %s: %w", t, err)
	}
	return nil
}
