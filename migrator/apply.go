package migrator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// apply runs one migration and records it: the SQL, the version bump, the history row and,
// when due, the notification, all in one transaction unless the migration is disable-tx.
func (m *Migrator) apply(ctx context.Context, conn *pgx.Conn, l *loadedLane, mig *Migration, start time.Time) error {
	if mig.batch != nil {
		return m.applyBatched(ctx, conn, l, mig, start)
	}
	if l.Mode == Background {
		defer m.sampleFile(ctx, conn, l, mig, start)() // progress of a long file: what the server knows
	}
	if mig.DisableTx {
		if err := m.execute(ctx, conn, nil, mig); err != nil {
			return err
		}
		if err := m.stillInTx(conn, mig, 'I'); err != nil {
			// Roll back what the migration left open, so that nothing of it is committed later
			// on this connection.
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			_, _ = conn.Exec(rctx, "rollback")
			return err
		}
		return m.inTx(ctx, conn, mig, func(tx pgx.Tx) error { return m.record(ctx, tx, l, mig, start) })
	}
	return m.inTx(ctx, conn, mig, func(tx pgx.Tx) error {
		if err := m.execute(ctx, conn, tx, mig); err != nil {
			return err
		}
		if err := m.stillInTx(conn, mig, 'T'); err != nil {
			return err
		}
		return m.record(ctx, tx, l, mig, start)
	})
}

// ErrTxEnded is wrapped by the *MigrationError of a migration that ended the transaction the
// Migrator runs it in (a COMMIT or ROLLBACK in a file, a Go migration committing through
// tx.Conn()), or that left a transaction open when it should run outside one. The version is not
// recorded; whatever the migration committed stays.
var ErrTxEnded = errors.New("the migration changed the transaction state the Migrator runs it in")

// stillInTx checks, before the version is recorded, that the connection's transaction status is
// the one the Migrator left it in: 'T' (inside the migration's transaction) for a transactional
// migration, 'I' (idle, no transaction) for a disable-tx one. A migration that committed the
// Migrator's transaction would otherwise have its version written in autocommit, and a crash in
// between would leave its effect without its version.
func (m *Migrator) stillInTx(conn *pgx.Conn, mig *Migration, want byte) error {
	got := conn.PgConn().TxStatus()
	if got == want {
		return nil
	}
	var why string
	switch {
	case want == 'T' && got == 'I':
		why = "it ended the transaction it runs in (a COMMIT, END or ROLLBACK inside it, or a Go migration ending it through tx.Conn()): what it did before that may be committed, but its version is not recorded; a transactional migration must not end its transaction (use a disable-tx file or GoMigration.UpNoTx for work that needs transactions of its own)"
	case want == 'T' && got == 'E':
		// A statement failed and the migration returned no error (a Go migration that dropped
		// it): recording would fail with "current transaction is aborted"; say what happened.
		return m.wrap(mig, statement{}, errors.New("a statement of the migration failed but the migration returned no error: its transaction is aborted and rolls back; nothing is recorded"))
	case want == 'I':
		why = "it left a transaction open although it runs outside one: its version is not recorded; commit or roll back what it begins"
	default:
		why = fmt.Sprintf("unexpected transaction status %q", got)
	}
	return m.wrap(mig, statement{}, fmt.Errorf("%w: %s", ErrTxEnded, why))
}

// inTx runs f in a transaction and commits it, rolling back on any error (on a context that is
// not cancelled, so a stop still rolls back cleanly).
func (m *Migrator) inTx(ctx context.Context, conn *pgx.Conn, mig *Migration, f func(pgx.Tx) error) error {
	tx, err := m.begin(ctx, conn)
	if err != nil {
		return m.wrap(mig, statement{}, fmt.Errorf("begin: %w", err))
	}
	if err := f(tx); err != nil {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = tx.Rollback(rctx) // the error is the one that matters; a dead connection rolls back by itself
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return m.wrap(mig, statement{}, fmt.Errorf("commit: %w", err))
	}
	return nil
}

// execute runs a migration: a transactional file as one simple-protocol query, exactly as tern
// does (so SQL that a statement splitter could misread, such as BEGIN ATOMIC bodies, runs as
// written); a disable-tx file statement by statement; a Go migration's function, given tx (the
// migration's transaction) or, registered with UpNoTx, the connection outside any transaction.
func (m *Migrator) execute(ctx context.Context, conn *pgx.Conn, tx pgx.Tx, mig *Migration) error {
	switch {
	case mig.Func != nil:
		if err := mig.Func(ctx, tx); err != nil {
			return m.wrap(mig, statement{}, err)
		}
		return nil
	case mig.FuncNoTx != nil:
		if err := mig.FuncNoTx(ctx, conn); err != nil {
			return m.wrap(mig, statement{}, err)
		}
		return nil
	}
	if !mig.DisableTx {
		if completed, err := execCounting(ctx, conn, mig.SQL); err != nil {
			return m.wrapFile(mig, completed, err)
		}
		return nil
	}
	for _, st := range mig.statements {
		if _, err := conn.Exec(ctx, st.SQL); err != nil {
			return m.wrap(mig, st, err)
		}
	}
	return nil
}

// execCounting sends sql as one simple-protocol query, as pgx's Exec does, and also returns how
// many of its statements completed (the server answers each with CommandComplete) before the
// one that failed.
func execCounting(ctx context.Context, conn *pgx.Conn, sql string) (completed int, err error) {
	mrr := conn.PgConn().Exec(ctx, sql)
	for mrr.NextResult() {
		if _, err := mrr.ResultReader().Close(); err != nil {
			break
		}
		completed++
	}
	return completed, mrr.Close()
}

// ErrNotLocated is wrapped by the *MigrationError of a whole-file migration whose failing
// statement could not be told: the server gave no position and the statements it completed do
// not map onto the file's statements.
var ErrNotLocated = errors.New("the failing statement could not be located")

// wrapFile wraps the error of a whole-file query, naming the statement and line from the error
// position when the server gives one (a position counts characters from 1 in the query sent),
// and otherwise from the number of statements the server completed before the error: the
// failing one is the next. Nothing is executed again to find it. When neither locates it, the
// error says so (ErrNotLocated) rather than name a statement that may be the wrong one.
func (m *Migrator) wrapFile(mig *Migration, completed int, err error) error {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return m.wrap(mig, statement{}, err)
	}
	if pgErr.Position <= 0 {
		if completed < len(mig.statements) {
			return m.wrap(mig, mig.statements[completed], err)
		}
		return m.wrap(mig, statement{}, fmt.Errorf("%w (%d statements completed, the file has %d): %w", ErrNotLocated, completed, len(mig.statements), err))
	}
	off, chars := 0, int(pgErr.Position)-1
	for off < len(mig.SQL) && chars > 0 {
		_, size := utf8.DecodeRuneInString(mig.SQL[off:])
		off += size
		chars--
	}
	me := m.wrap(mig, statement{}, err).(*MigrationError)
	me.Line = mig.lineOffset + 1 + strings.Count(mig.SQL[:off], "\n")
	for _, st := range mig.statements {
		if st.Offset <= off && off <= st.Offset+len(st.SQL) {
			me.Statement, me.offset = st.SQL, off-st.Offset+1
		}
	}
	return me
}

// wrap turns err into a *MigrationError naming the lane, the file, the statement and its line.
func (m *Migrator) wrap(mig *Migration, st statement, err error) error {
	var me *MigrationError
	if errors.As(err, &me) {
		return err
	}
	me = &MigrationError{Lane: mig.Lane, Version: mig.Version, File: mig.Name, Statement: st.SQL, Err: err}
	if st.SQL != "" {
		me.Line = mig.lineOffset + st.Line
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		me.SQLState = pgErr.Code
		if st.SQL != "" && pgErr.Position > 0 {
			// Position counts characters from 1 within the statement sent.
			runes := []rune(st.SQL)
			if p := int(pgErr.Position) - 1; p <= len(runes) {
				before := string(runes[:p])
				me.Line += strings.Count(before, "\n")
				me.offset = len(before) + 1
			}
		}
	}
	return me
}
