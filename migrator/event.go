package migrator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
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
