package app

// Events: the live feed of the page (GET /events, Server-Sent Events). What moves it is the
// replica's own listener: every notification it receives (and every connect or poll, and every
// change of the replica's own state) bumps a generation. A stream waits for the next bump, then
// sends the page's state, read from the database once per bump for all streams together
// (coalesced: at most one read runs at a time, spaced by minPageRead, and a read serves every
// bump that arrived before it began). Nothing reads the database on a timer: a replica with no
// notifications and no changes sends nothing but keep-alive comments.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/multilanes/lanes/internal/wire"
)

const (
	// minPageRead spaces the page's database reads: a flood of notifications (any role may
	// NOTIFY) costs at most one read per minPageRead, and a state change still shows within
	// a second.
	minPageRead = 250 * time.Millisecond
	// keepAlive is how often an idle stream sends a comment, so that proxies keep it open and a
	// client that went away is noticed by the server's next write at the latest.
	keepAlive = 25 * time.Second
)

// events holds the page's generation and its last state read. Its methods are safe for
// concurrent use.
type events struct {
	mu      sync.Mutex
	gen     uint64        // bumped by every notification, poll and state change
	changed chan struct{} // closed at the next bump; nil while no stream waits (a bump is cheap then)
	stop    chan struct{} // closed by StopEvents: every stream ends
	stopped bool

	reading chan struct{} // a one-slot semaphore: one page read at a time
	snapGen uint64        // the generation snap was read for
	snap    *pageState
	readAt  time.Time    // when the last read began
	reads   atomic.Int64 // page reads made, for tests
}

func newEvents() *events {
	return &events{gen: 1, stop: make(chan struct{}), reading: make(chan struct{}, 1)}
}

// bump marks the page's state as changed and wakes every stream. It runs for every
// notification, so it allocates nothing while no stream waits.
func (e *events) bump() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.gen++
	if e.changed != nil {
		close(e.changed)
		e.changed = nil
	}
}

// current returns the generation and the channel closed at the next bump.
func (e *events) current() (uint64, <-chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.changed == nil {
		e.changed = make(chan struct{})
	}
	return e.gen, e.changed
}

// StopEvents ends every open /events stream and answers later ones with 204 No Content (which
// tells a browser's EventSource not to reconnect). http.Server.Shutdown waits for running
// handlers and a stream never ends by itself: register it with the server,
// srv.RegisterOnShutdown(rt.StopEvents), or call it before Shutdown. Close calls it too. It is
// idempotent and safe for concurrent use.
func (r *Runtime) StopEvents() {
	e := r.events
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.stopped {
		e.stopped = true
		close(e.stop)
	}
}

// pageSnapshot returns the page's state for generation gen or later: the last read when it is
// recent enough, else a new read shared by every caller waiting meanwhile. fresh forces a read
// (a page load). It returns nil when ctx is done or the events are stopped first.
func (r *Runtime) pageSnapshot(ctx context.Context, gen uint64, fresh bool) *pageState {
	e := r.events
	select {
	case e.reading <- struct{}{}:
	case <-ctx.Done():
		return nil
	case <-e.stop:
		return nil
	}
	defer func() { <-e.reading }()
	e.mu.Lock()
	snap, snapGen, readAt := e.snap, e.snapGen, e.readAt
	e.mu.Unlock()
	if snap != nil && snapGen >= gen && !fresh {
		return snap
	}
	if wait := time.Until(readAt.Add(minPageRead)); wait > 0 && !fresh {
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-e.stop:
			t.Stop()
			return nil
		}
	}
	gen, _ = e.current() // the read below covers every bump so far
	now := time.Now()
	e.reads.Add(1)
	snap = r.readPage(ctx)
	if ctx.Err() != nil {
		return nil // the caller went away during the read: its error is no state to show
	}
	e.mu.Lock()
	if gen >= e.snapGen {
		e.snap, e.snapGen = snap, gen
	}
	e.readAt = now
	e.mu.Unlock()
	return snap
}

// eventMessage is the data of an /events "state" event: the page's lanes section rendered (what
// the page's script puts in place) and the state it shows.
type eventMessage struct {
	HTML  string     `json:"html"`
	State *pageState `json:"state"`
}

// serveEvents streams the page's state as Server-Sent Events: one "state" event at once, then
// one after each change the replica learns of. It ends when the client goes, or at StopEvents
// or Close.
func (r *Runtime) serveEvents(w http.ResponseWriter, req *http.Request) {
	rc := http.NewResponseController(w)
	e := r.events
	select {
	case <-e.stop:
		w.WriteHeader(http.StatusNoContent)
		return
	default:
	}
	ctx := req.Context()
	// A stream lasts: lift the server's WriteTimeout for it, where the writer allows.
	_ = rc.SetWriteDeadline(time.Time{})
	// A subscriber follows every change: the listener stays connected while the stream runs,
	// even once every lane is done.
	release := r.Listen()
	defer release()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	w.WriteHeader(http.StatusOK)
	// retry: how long a browser waits before reconnecting after the stream broke.
	if _, err := fmt.Fprint(w, "retry: 1000\n\n"); err != nil || rc.Flush() != nil {
		return
	}
	ka := time.NewTicker(keepAlive)
	defer ka.Stop()
	var last []byte
	for {
		gen, changed := e.current()
		if snap := r.pageSnapshot(ctx, gen, false); snap != nil {
			msg, err := r.eventData(snap)
			if err != nil {
				r.log.Warn().Err(err).Msg("page: render the live update")
			} else if string(msg) != string(last) {
				last = msg
				if _, err := fmt.Fprintf(w, "event: state\nid: %d\ndata: %s\n\n", gen, msg); err != nil || rc.Flush() != nil {
					return
				}
			}
		}
		for waiting := true; waiting; {
			select {
			case <-ctx.Done():
				return
			case <-e.stop:
				return
			case <-changed:
				waiting = false
			case <-ka.C:
				if _, err := fmt.Fprint(w, ": keep-alive\n\n"); err != nil || rc.Flush() != nil {
					return
				}
			}
		}
	}
}

// eventData is the JSON of an /events message: one line, as an SSE data field wants.
func (r *Runtime) eventData(snap *pageState) ([]byte, error) {
	html, err := renderLanes(snap)
	if err != nil {
		return nil, err
	}
	return json.Marshal(eventMessage{HTML: html, State: snap})
}

// Notice is the last notification a replica's listener received, as the replica read it.
type Notice struct {
	At      time.Time `json:"at"`
	Lane    string    `json:"lane,omitempty"`
	Version int32     `json:"version,omitempty"`
	// Kind is the event's state (applied, done, failed, released), "progress", the operator's
	// control (pause, resume, retry), or "ignored" for a payload that is no lanes event.
	Kind string `json:"kind"`
}

// noticeOf describes a notification from its payload parsed (ev, or err when it is no lanes
// event), which is a hint only and never shown verbatim.
func noticeOf(ev wire.Event, err error, at time.Time) *Notice {
	if err != nil {
		return &Notice{At: at, Kind: "ignored"}
	}
	n := &Notice{At: at, Lane: ev.Lane, Version: ev.Version, Kind: ev.State}
	switch {
	case ev.Progress != nil:
		n.Kind = "progress"
	case ev.Control != "":
		n.Kind = ev.Control
	}
	return n
}
