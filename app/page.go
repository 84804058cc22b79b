package app

// The page: GET / renders every lane's state on the server (it works without JavaScript), and a
// small script from the same embedded files (no build step, nothing from elsewhere) replaces
// the lanes section with each update from /events (events.go).

import (
	"bytes"
	"context"
	"embed"
	"fmt"
	"html/template"
	"io/fs"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/multilanes/lanes/internal/engine"
	"github.com/multilanes/lanes/migrator"
)

//go:embed web
var webFS embed.FS

// historyRows is how many history rows the page shows per lane.
const historyRows = 20

var pageTmpl = template.Must(template.New("").Funcs(template.FuncMap{
	"pct":      pct,
	"pctValue": func(p *float64) string { return strconv.FormatFloat(*p, 'f', 1, 64) },
	"secs":     secs,
	"rate":     func(v float64) string { return strconv.FormatFloat(v, 'f', 1, 64) },
	"ts":       func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05 UTC") },
	"tsp": func(t *time.Time) string {
		if t == nil {
			return "unknown"
		}
		return t.UTC().Format("2006-01-02 15:04:05 UTC")
	},
	"num": num,
}).ParseFS(webFS, "web/page.html"))

// pageState is what the page shows: the lanes read from the database, with their lock holders
// and history, and this replica's view. It is the "state" of an /events message.
type pageState struct {
	At time.Time `json:"at"`
	// Error is why the database could not be read (string literals masked); Lanes then hold
	// what this replica last learned.
	Error   string      `json:"error,omitempty"`
	Lanes   []pageLane  `json:"lanes"`
	Replica ReplicaView `json:"replica"`
}

// pageLane is one lane on the page.
type pageLane struct {
	migrator.LaneStatus                      // Redacted
	FailureLine         int                  `json:"failure_line,omitempty"` // the failing statement's line in the file; 0 when unknown
	Holder              *migrator.LockHolder `json:"holder,omitempty"`
	// History is the lane's newest history rows, newest first, errors and statements masked.
	History []migrator.HistoryEntry `json:"history"`
}

// readPage reads the page's state from the database on a connection of its own: the status,
// who holds each lane's lock, and each lane's newest history rows. When the database cannot be read,
// it says why and shows what the replica last learned.
func (r *Runtime) readPage(ctx context.Context) *pageState {
	ctx, cancel := context.WithTimeout(ctx, statusTimeout)
	defer cancel()
	ps := &pageState{At: time.Now()}
	var (
		st      = Status{Replica: r.View()}
		holders map[string]migrator.LockHolder
	)
	conn, err := engine.Connect(ctx, r.m)
	if err == nil {
		defer conn.Close(context.WithoutCancel(ctx))
		st, err = r.statusOn(ctx, conn)
	}
	ps.Replica = st.Replica
	if err == nil {
		holders, err = r.m.LockHolders(ctx, conn)
	}
	lanes := st.Lanes
	if err != nil {
		ps.Error = migrator.MaskLiterals(err.Error())
		lanes = r.knownStatuses()
	}
	for _, l := range lanes {
		pl := pageLane{LaneStatus: redact(l)}
		if h, ok := holders[l.Name]; ok {
			pl.Holder = &h
		}
		if pl.Progress == nil {
			pl.Progress = r.Progress(l.Name) // a long file's progress is announced only
		}
		if f := pl.Failure; f != nil {
			pl.FailureLine = failureLine(pl.Error, f.File)
		}
		if err == nil {
			h, herr := r.m.History(ctx, conn, l.Name, historyRows)
			if herr != nil {
				ps.Error = migrator.MaskLiterals(herr.Error())
			}
			for i := range h {
				h[i].Error, h[i].Statement = redactError(h[i].Error), migrator.MaskLiterals(h[i].Statement)
			}
			pl.History = h
		}
		ps.Lanes = append(ps.Lanes, pl)
	}
	return ps
}

// redact masks what anyone who reaches the page or /lanes must not read in a lane's status:
// string literals (LaneStatus.Redacted) and the offending value a data exception quotes
// (redactError).
func redact(st migrator.LaneStatus) migrator.LaneStatus {
	st = st.Redacted()
	st.Error = redactError(st.Error)
	return st
}

// redactError masks an error message's string literals (migrator.MaskLiterals) and, for a data
// exception (SQLSTATE class 22), the double-quoted text of the server's message: there it is
// the offending value, row data such as `invalid input syntax for type integer: "<value>"`.
// Other messages keep their double quotes, which name relations and columns.
func redactError(msg string) string {
	msg = migrator.MaskLiterals(msg)
	if !strings.Contains(msg, "(SQLSTATE 22") {
		return msg
	}
	head, server, ok := strings.Cut(msg, "ERROR: ")
	if !ok {
		return msg
	}
	var b strings.Builder
	b.WriteString(head + "ERROR: ")
	for {
		before, rest, ok := strings.Cut(server, `"`)
		if !ok {
			b.WriteString(server)
			return b.String()
		}
		b.WriteString(before + `"***"`)
		_, server, ok = strings.Cut(rest, `"`)
		if !ok {
			return b.String()
		}
	}
}

// knownStatuses returns the lanes' state as this replica last learned it.
func (r *Runtime) knownStatuses() []migrator.LaneStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]migrator.LaneStatus, 0, len(r.lanes))
	for _, l := range r.lanes {
		out = append(out, r.state[l.Name].status)
	}
	return out
}

// failureLine finds the line of a failure in its error text ("lane \"x\": 003_y.sql line 7: ..."),
// 0 when the text does not say.
func failureLine(msg, file string) int {
	_, after, ok := strings.Cut(msg, file+" line ")
	if !ok {
		return 0
	}
	end := strings.IndexFunc(after, func(c rune) bool { return c < '0' || c > '9' })
	if end < 0 {
		end = len(after)
	}
	n, _ := strconv.Atoi(after[:end])
	return n
}

// renderLanes renders the page's lanes section, what an /events message carries.
func renderLanes(ps *pageState) (string, error) {
	var b bytes.Buffer
	if err := pageTmpl.ExecuteTemplate(&b, "lanes", ps); err != nil {
		return "", fmt.Errorf("render page: %w", err)
	}
	return b.String(), nil
}

// pageSecurity is the page's Content-Security-Policy: its own script and style only, no
// inline script, nothing from elsewhere, and no form or frame (the page is read-only).
const pageSecurity = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// servePage renders the page with the state read fresh from the database.
func (r *Runtime) servePage(w http.ResponseWriter, req *http.Request) {
	ps := r.pageSnapshot(req.Context(), 0, true)
	if ps == nil {
		http.Error(w, "stopping", http.StatusServiceUnavailable)
		return
	}
	var b bytes.Buffer
	if err := pageTmpl.ExecuteTemplate(&b, "page.html", ps); err != nil {
		r.log.Warn().Err(err).Msg("page: render")
		http.Error(w, "could not render the page", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Security-Policy", pageSecurity)
	w.Header().Set("X-Content-Type-Options", "nosniff")
	_, _ = w.Write(b.Bytes()) // a client that went away is no error of ours
}

// pageAssets serves the page's script and style sheet.
func pageAssets() http.Handler {
	sub, err := fs.Sub(webFS, "web")
	if err != nil {
		panic(err) // the embedded directory is part of the binary
	}
	files := http.FileServerFS(sub)
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("X-Content-Type-Options", "nosniff")
		files.ServeHTTP(w, req)
	})
}

// pct formats a percentage; "?" when unknown.
func pct(p *float64) string {
	if p == nil {
		return "?"
	}
	return strconv.FormatFloat(*p, 'f', 1, 64) + " %"
}

// secs formats a number of seconds as 850ms, 12.3s, 4m05s or 2h03m; "?" when unknown.
func secs(v any) string {
	var s float64
	switch x := v.(type) {
	case float64:
		s = x
	case *float64:
		if x == nil {
			return "?"
		}
		s = *x
	}
	switch {
	case s == 0:
		return "0s"
	case s < 1:
		return strconv.Itoa(int(math.Round(s*1000))) + "ms"
	case s < 60:
		return strconv.FormatFloat(s, 'f', 1, 64) + "s"
	case s < 3600:
		return fmt.Sprintf("%dm%02ds", int(s)/60, int(s)%60)
	default:
		return fmt.Sprintf("%dh%02dm", int(s)/3600, int(s)%3600/60)
	}
}

// num formats an integer with thin separators between thousands.
func num(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteString(",")
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}
