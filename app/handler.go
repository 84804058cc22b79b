package app

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/multilanes/lanes/migrator"
)

// statusTimeout bounds the database read behind GET /lanes.
const statusTimeout = 5 * time.Second

// Handler returns the replica's HTTP endpoints, what `lanes serve` serves, for a service to
// mount on its own server:
//
//   - GET /healthz: 200 "ok" while the process runs (a liveness probe; it never touches the
//     database, so a database outage does not get the replica restarted);
//   - GET /readyz: 503 until the blocking lanes are applied, then 200 (a readiness probe);
//   - GET /lanes: the lanes read fresh from the database (lock-free) plus this replica's view,
//     as the JSON of Status with an "error" field; 503 with the replica's view when the
//     database cannot be read. Errors are shown with their string literals masked
//     (LaneStatus.Redacted), and so is the value a data exception (SQLSTATE class 22) quotes;
//   - GET /metrics: the Prometheus text format of Collector, with the Go runtime's and the
//     process's collectors, from a registry of the handler's own (never the global one);
//   - GET /: a page for people with every lane's state, the running migration's progress,
//     rate and ETA, who holds each lane's lock, the last failure and the newest history rows
//     (string literals masked), and this replica's view; rendered on the server, so it works
//     without JavaScript, with its script and style sheet at /page.js and /page.css;
//   - GET /events: the page's live updates as Server-Sent Events: a "state" event at once and
//     after each change this replica hears of (its listener's notifications, polls and own
//     migrations; the database is read once per change for every open stream together, never
//     on a timer), whose data is JSON {"html": the page's lanes section, "state": what it
//     shows}. A stream ends when its client goes, at StopEvents or at Close: register
//     StopEvents with http.Server.RegisterOnShutdown, since Shutdown waits for open streams.
//
// The handler is read-only: nothing it serves changes the database. It may be called before
// Start (a starting replica answers /healthz and says what it waits for) and is safe for
// concurrent use. Mount it under a prefix with http.StripPrefix, keeping the prefix's trailing slash for the
// page (its links are relative): mux.Handle("/lanes/", http.StripPrefix("/lanes", h)).
func (r *Runtime) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", r.serveReadyz)
	mux.HandleFunc("GET /lanes", r.serveLanes)
	reg := prometheus.NewRegistry()
	reg.MustRegister(r.metrics, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /{$}", r.servePage)
	mux.HandleFunc("GET /events", r.serveEvents)
	assets := pageAssets()
	mux.Handle("GET /page.js", assets)
	mux.Handle("GET /page.css", assets)
	return mux
}

func (r *Runtime) serveReadyz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if !r.Ready() {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "not ready: applying the blocking lanes")
		return
	}
	fmt.Fprintln(w, "ready")
}

// LanesResponse is the JSON body of GET /lanes: Status, plus the error when the lanes could
// not be read from the database (then Lanes is empty and Replica still holds this replica's
// view).
type LanesResponse struct {
	Status
	Error string `json:"error,omitempty"`
}

// serveLanes answers the lanes' state read fresh from the database, with this replica's view.
// It works while the blocking lanes are being applied too.
func (r *Runtime) serveLanes(w http.ResponseWriter, req *http.Request) {
	ctx, cancel := context.WithTimeout(req.Context(), statusTimeout)
	defer cancel()
	var resp LanesResponse
	st, err := r.Status(ctx)
	// Anyone who reaches the endpoint reads it: errors are shown with their string literals
	// masked (a failing statement may quote a password) and so is the value a data exception
	// quotes.
	for i := range st.Lanes {
		st.Lanes[i] = redact(st.Lanes[i])
	}
	resp.Status = st
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if err != nil {
		resp.Error = migrator.MaskLiterals(err.Error())
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(resp) // a client that went away is no error of ours
}
