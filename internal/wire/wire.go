// Package wire is the notification payload multi-lanes sends on its channel: what a lane's
// event, progress and control announcements carry, and how a receiver decodes them. Any role
// may NOTIFY any channel, so every payload is a hint that a receiver verifies.
package wire

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
)

// LaneName is the pattern a lane's name matches.
var LaneName = regexp.MustCompile(`\A[a-z][a-z0-9_]{0,39}\z`)

// The states an Event announces.
const (
	Applied  = "applied"  // a migration of a background lane committed; the lane is not done
	Done     = "done"     // the lane's last migration known to the sender committed
	Failed   = "failed"   // a migration to Version failed (see the history table for why)
	Released = "released" // the applying session stopped before the end and released the lane's lock
)

// Event is the JSON payload of a notification. It is a hint only: any role may NOTIFY any
// channel, so a receiver re-reads the version tables before believing it. It carries the lane,
// the version, the state and the file only: any role that can connect may LISTEN, so an error
// (which may quote a statement and its literals, such as a password) is never sent; it is in
// the history table.
type Event struct {
	Lane    string `json:"lane"`
	Version int32  `json:"version"`
	// State is Applied, Done, Failed or Released; empty on progress and
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

// Parse decodes a notification payload. Payloads that are not an Event return an error.
// Payloads of earlier releases ({"done":true}, {"error":...}, {"released":true}) are read as
// the matching state; their error text is dropped.
func Parse(payload string) (Event, error) {
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
	if !LaneName.MatchString(e.Lane) {
		return Event{}, fmt.Errorf("decode event: invalid lane %q", e.Lane)
	}
	if e.State == "" && e.Progress == nil && e.Control == "" {
		switch {
		case e.Error != "":
			e.State = Failed
		case e.Released:
			e.State = Released
		case e.Done:
			e.State = Done
		default:
			e.State = Applied
		}
	}
	return e.Event, nil
}

// Payload encodes e.
func (e Event) Payload() string {
	b, _ := json.Marshal(e) // cannot fail: strings and numbers only
	return string(b)
}

// ProgressHint is the progress part of a notification: small, and a hint like every payload.
type ProgressHint struct {
	Done      int64   `json:"done"`
	Total     int64   `json:"total"`
	Rate      float64 `json:"rate,omitempty"`
	Throttled string  `json:"throttled,omitempty"`
	// Phase and Elapsed (seconds) are set for a migration that is not batched.
	Phase   string  `json:"phase,omitempty"`
	Elapsed float64 `json:"elapsed,omitempty"`
}

// PercentETA returns the percent done (at most 99.9 until the end is known) and the seconds
// left at rate rows per second; nil when unknown.
func PercentETA(done, total int64, rate float64) (percent, eta *float64) {
	if total <= 0 {
		return nil, nil
	}
	pct := math.Min(99.9, 100*float64(done)/float64(total))
	pct = math.Round(pct*10) / 10
	percent = &pct
	if rate > 0 {
		e := math.Round(float64(max(0, total-done)) / rate)
		eta = &e
	}
	return percent, eta
}
