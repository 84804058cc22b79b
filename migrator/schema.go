package migrator

import (
	"context"
	"errors"
	"fmt"
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

// resolvedTable is a lane's version table as one session sees it.
type resolvedTable struct {
	table  tableName // schema-qualified; Schema is "" only when the session has no schema to create it in
	exists bool
	leases bool // the lease table exists (the same for every lane)
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
	rows, err := q.Query(ctx, `select coalesce(n.nspname, nullif(u.s, ''), current_schema(), ''), c.oid is not null, to_regclass($3) is not null, to_regclass($4) is not null
from unnest($1::text[], $2::text[]) with ordinality u(t, s, i)
left join pg_class c on c.oid = to_regclass(u.t)
left join pg_namespace n on n.oid = c.relnamespace
order by u.i`, names, schemas, m.history.Quoted(), m.leaseTable().Quoted())
	if err != nil {
		return nil, false, fmt.Errorf("resolve version tables: %w", err)
	}
	out := make([]resolvedTable, 0, len(m.lanes))
	for rows.Next() {
		var r resolvedTable
		if err := rows.Scan(&r.table.Schema, &r.exists, &historyExists, &r.leases); err != nil {
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
