package migrator

import (
	"context"
	"fmt"
	"hash/fnv"
	"strings"

	"github.com/jackc/pgx/v5"
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

// lockKey derives the lane's advisory lock key from its version table: two lanes share a lock
// only when they share a version table. The key differs from tern's constant lock number, so a
// lane never waits for tern's lock, nor tern for a lane's.
func (t tableName) lockKey() int64 {
	h := fnv.New64a()
	h.Write([]byte("multi-lanes:" + t.String()))
	return int64(h.Sum64())
}

// setupLockKey serialises creating the shared history table across lanes and processes.
var setupLockKey = func() int64 {
	h := fnv.New64a()
	h.Write([]byte("multi-lanes:setup"))
	return int64(h.Sum64())
}()

// ensureVersionTable creates the lane's version table in tern's format (one row, version int4
// not null primary key, starting at 0) when it does not exist. The caller holds the lane lock.
func ensureVersionTable(ctx context.Context, conn *pgx.Conn, t tableName) error {
	q := t.Quoted()
	_, err := conn.Exec(ctx, fmt.Sprintf(`create table if not exists %s(version int4 not null primary key);
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
