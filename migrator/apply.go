package migrator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// The states an Event announces.
const (
	EventApplied  = "applied"  // a migration of a background lane committed; the lane is not done
	EventDone     = "done"     // the lane's last migration known to the sender committed
	EventFailed   = "failed"   // a migration to Version failed (see the history table for why)
	EventReleased = "released" // the applying session stopped before the end and released the lane's lock
)

// Event is the JSON payload of a notification. It is a hint only: any role may NOTIFY any
// channel, so a receiver re-reads the version tables before believing it. It carries the lane,
// the version, the state and the file only: any role that can connect may LISTEN, so an error
// (which may quote a statement and its literals, such as a password) is never sent; it is in
// the history table.
type Event struct {
	Lane    string `json:"lane"`
	Version int32  `json:"version"`
	// State is EventApplied, EventDone, EventFailed or EventReleased; empty on progress and
	// control announcements.
	State string `json:"state,omitempty"`
	// File is the migration's file name ("NNN_title.sql", "NNN_name.go"); empty for released.
	File string `json:"file,omitempty"`
	// Progress is set on the progress announcements of a batched migration to Version.
	Progress *ProgressHint `json:"progress,omitempty"`
	// Control is set when an operator paused ("pause"), resumed ("resume") or cleared a
	// failure of ("retry") the lane.
	Control string `json:"control,omitempty"`
}

// ParseEvent decodes a notification payload. Payloads that are not an Event return an error.
// Payloads of earlier releases ({"done":true}, {"error":...}, {"released":true}) are read as
// the matching state; their error text is dropped.
func ParseEvent(payload string) (Event, error) {
	var e struct {
		Event
		Done     bool   `json:"done"`
		Error    string `json:"error"`
		Released bool   `json:"released"`
	}
	if len(payload) > 8000 {
		return Event{}, errors.New("payload too long")
	}
	if err := json.Unmarshal([]byte(payload), &e); err != nil {
		return Event{}, fmt.Errorf("decode event: %w", err)
	}
	if !laneNamePattern.MatchString(e.Lane) {
		return Event{}, fmt.Errorf("decode event: invalid lane %q", e.Lane)
	}
	if e.State == "" && e.Progress == nil && e.Control == "" {
		switch {
		case e.Error != "":
			e.State = EventFailed
		case e.Released:
			e.State = EventReleased
		case e.Done:
			e.State = EventDone
		default:
			e.State = EventApplied
		}
	}
	return e.Event, nil
}

func (e Event) payload() string {
	b, _ := json.Marshal(e) // cannot fail: strings and numbers only
	return string(b)
}

// apply runs one migration and records it: the SQL, the version bump, the history row and,
// when due, the notification, all in one transaction unless the migration is disable-tx.
func (m *Migrator) apply(ctx context.Context, conn *pgx.Conn, l *loadedLane, mig *Migration, start time.Time) error {
	if mig.batch != nil {
		return m.applyBatched(ctx, conn, l, mig, start)
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
		return nil // a failed transaction: recording fails and the whole transaction rolls back
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
	tx, err := conn.Begin(ctx)
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

// record bumps the lane's version, writes the history row and, when due, notifies: one round
// trip, inside the migration's transaction. The version update only matches the expected
// previous version, so a version table changed behind the lock is detected, not overwritten.
func (m *Migrator) record(ctx context.Context, tx pgx.Tx, l *loadedLane, mig *Migration, start time.Time) error {
	b := &pgx.Batch{}
	b.Queue("reset all") // like tern: a migration's SET must not leak into the bookkeeping
	b.Queue("update "+l.table.Quoted()+" set version = $1 where version = $2", mig.Version, mig.Version-1)
	b.Queue("insert into "+m.history.Quoted()+` (lane, version, name, checksum, started_at, finished_at, host, pid, application_name)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9)`, l.Name, mig.Version, mig.Name, mig.Checksum, start, m.cfg.Now(), m.host, m.pid, m.appName)
	last := mig.Version == l.latest()
	if last || l.Mode == Background {
		state := EventApplied
		if last {
			state = EventDone
		}
		b.Queue("select pg_notify($1, $2)", m.cfg.Channel, Event{Lane: l.Name, Version: mig.Version, State: state, File: mig.Name}.payload())
	}
	// reset all also reset the session settings set after connecting (they are not startup
	// parameters): set them again, unless the server refused them before.
	if !m.setFailed.Load() {
		restore, err := m.restoreSessionSQL(ctx, tx.Conn().PgConn())
		if err != nil {
			return m.wrap(mig, statement{}, fmt.Errorf("record version: %w", err))
		}
		if restore != "" {
			b.Queue(restore)
		}
	}
	br := tx.SendBatch(ctx, b)
	_, err := br.Exec()
	var tag pgconn.CommandTag
	if err == nil {
		tag, err = br.Exec()
	}
	if err == nil && tag.RowsAffected() != 1 {
		err = fmt.Errorf("version table %s is no longer at version %d: changed outside the lane lock", l.table, mig.Version-1)
	}
	for i := 2; err == nil && i < b.Len(); i++ {
		_, err = br.Exec()
	}
	if cerr := br.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return m.wrap(mig, statement{}, fmt.Errorf("record version: %w", err))
	}
	return nil
}

// recordFailure writes the failed attempt to the history table, best effort: when the
// connection is gone or the caller stopped, the failure is only returned. It returns the event
// to announce after the lane's lock is released (nil when nothing was recorded): announced
// earlier, replicas re-reading the lane would still see it locked and could not tell a failed
// lane from a running one.
func (m *Migrator) recordFailure(ctx context.Context, conn *pgx.Conn, l *loadedLane, mig *Migration, start time.Time, cause error) *Event {
	log := m.cfg.Logger.Error().Err(cause).Str("lane", l.Name).Int32("version", mig.Version).Str("file", mig.Name)
	if ctx.Err() != nil || conn.IsClosed() {
		log.Msg("migration stopped")
		return nil
	}
	log.Bool("transient", IsTransient(cause)).Msg("migration failed")
	var me *MigrationError
	errors.As(cause, &me)
	msg := truncate(cause.Error(), maxErrorBytes)
	var sqlstate, stmt *string
	if me != nil {
		if me.SQLState != "" {
			sqlstate = &me.SQLState
		}
		if me.Statement != "" {
			ex := excerpt(me.Statement, me.offset-1, maxStatementBytes)
			stmt = &ex
		}
	}
	_, err := conn.Exec(ctx, "insert into "+m.history.Quoted()+` (lane, version, name, checksum, started_at, finished_at, host, pid, application_name, error, sqlstate, statement)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)`, l.Name, mig.Version, mig.Name, mig.Checksum, start, m.cfg.Now(), m.host, m.pid, m.appName, msg, sqlstate, stmt)
	if err != nil {
		m.cfg.Logger.Warn().Err(err).Str("lane", l.Name).Msg("could not record the failure in the history table")
		return nil
	}
	return &Event{Lane: l.Name, Version: mig.Version, State: EventFailed, File: mig.Name}
}

// The bounds of what a failed attempt stores in the history table (and so what a status read
// fetches): a failing statement of a multi-megabyte file must not be copied into every status
// read of every replica.
const (
	maxErrorBytes     = 4000 // the error text
	maxStatementBytes = 2000 // the excerpt of the failing statement around the error position
)

// truncate cuts s to at most n bytes at a character boundary, ending with "…" when cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	n -= len("…")
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// excerpt returns at most n bytes of stmt around byte offset pos (the error position; -1 when
// unknown, then the start), cut at character boundaries and marked "…" where cut.
func excerpt(stmt string, pos, n int) string {
	if len(stmt) <= n {
		return stmt
	}
	if pos < 0 || pos > len(stmt) {
		pos = 0
	}
	room := n - 2*len("…")
	start := max(0, pos-room/2)
	end := min(len(stmt), start+room)
	start = max(0, end-room)
	for start < end && !utf8.RuneStart(stmt[start]) {
		start++
	}
	for end < len(stmt) && end > start && !utf8.RuneStart(stmt[end]) {
		end--
	}
	out := stmt[start:end]
	if start > 0 {
		out = "…" + out
	}
	if end < len(stmt) {
		out += "…"
	}
	return out
}

// announce sends ev on the channel, best effort, also after ctx was cancelled (a stop).
func (m *Migrator) announce(ctx context.Context, conn *pgx.Conn, ev Event) {
	if conn.IsClosed() {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, "select pg_notify($1, $2)", m.cfg.Channel, ev.payload()); err != nil {
		m.cfg.Logger.Warn().Err(err).Str("lane", ev.Lane).Msg("could not announce the lane's event")
	}
}
