// Package migrator applies PostgreSQL migrations in lanes.
//
// A lane is a folder of tern-format files (NNN_title.sql numbered from 1 without gaps, the
// `---- create above / drop below ----` separator, text/template with Sprig, shared templates
// in subfolders, `---- tern: disable-tx ----`) plus Go migrations registered on the lane, and
// it has its own version table in tern's format, so the stock tern CLI pointed at the lane's
// folder and version table reads the same state.
//
// tern's own Migrator is used to load and render files but not to apply them: it takes one
// constant advisory lock for every version table, so a slow lane applied through it would stall
// every replica's start-up. Instead each lane has its own session-level advisory lock, keyed by
// its version table and held on a dedicated connection. Migrate first reads the lane's version
// without any lock and returns when nothing is pending; otherwise it polls
// pg_try_advisory_lock (never a blocking pg_advisory_lock, whose waiting snapshot would
// deadlock with a CREATE INDEX CONCURRENTLY run by the holder) and re-checks under the lock.
//
// Each migration, its version bump and its history row commit in one transaction; the same
// transaction sends NOTIFY on the channel (default "lanes_done") with an Event payload when a
// background lane's migration commits or a blocking lane's last one does. A disable-tx
// migration runs outside a transaction, then a short transaction records it.
//
// Errors: *LoadError for lanes that cannot be loaded (nothing applied), *MigrationError naming
// lane, file, statement, line and SQLSTATE for a failed migration, ErrLocked from TryMigrate.
package migrator
