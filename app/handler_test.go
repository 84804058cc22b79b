package app_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/migrator"
)

// httpGet returns the status code and body of a GET on the handler.
func httpGet(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	srv := httptest.NewServer(h)
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func lanesOf(t *testing.T, h http.Handler) app.LanesResponse {
	t.Helper()
	code, body := httpGet(t, h, "/lanes")
	var resp app.LanesResponse
	if err := json.Unmarshal([]byte(body), &resp); err != nil || code != http.StatusOK {
		t.Fatalf("/lanes: %d %s (%v)", code, body, err)
	}
	return resp
}

func TestHandlerServesProbesAndLanes(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	r := e.runtime(fastLane, slowLane(g))
	h := r.Handler()

	// Before Start: alive, not ready, the lanes readable.
	if code, body := httpGet(t, h, "/healthz"); code != http.StatusOK || strings.TrimSpace(body) != "ok" {
		t.Errorf("/healthz before Start: %d %q", code, body)
	}
	if code, body := httpGet(t, h, "/readyz"); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz before Start: want 503, got %d %q", code, body)
	}
	resp := lanesOf(t, h)
	if resp.Replica.Ready || len(resp.Lanes) != 2 || resp.Lanes[0].State != migrator.StatePending || resp.Lanes[0].Latest != 2 {
		t.Errorf("/lanes before Start: %+v", resp)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if code, body := httpGet(t, h, "/readyz"); code != http.StatusOK || strings.TrimSpace(body) != "ready" {
		t.Errorf("/readyz after Start: %d %q", code, body)
	}
	waitStarted(t, g)
	resp = lanesOf(t, h)
	if !resp.Replica.Ready || resp.Lanes[0].State != migrator.StateDone || resp.Lanes[1].State != migrator.StateRunning || !resp.Lanes[1].Locked {
		t.Errorf("/lanes while the slow lane runs: %+v", resp)
	}
	close(g.release)
	waitDone(t, r, "slow")
	resp = lanesOf(t, h)
	if resp.Lanes[1].State != migrator.StateDone || resp.Lanes[1].Version != 2 {
		t.Errorf("/lanes after the slow lane: %+v", resp.Lanes[1])
	}
	var known *app.KnownLane
	for i := range resp.Replica.Lanes {
		if resp.Replica.Lanes[i].Name == "slow" {
			known = &resp.Replica.Lanes[i]
		}
	}
	if known == nil || !known.Done || known.DoneAt == nil {
		t.Errorf("/lanes replica view of slow: %+v", known)
	}
	if code, _ := httpGet(t, h, "/nothing"); code != http.StatusNotFound {
		t.Errorf("/nothing: want 404, got %d", code)
	}
}

func TestHandlerLanesWithoutDatabase(t *testing.T) {
	t.Parallel()
	cc, err := pgx.ParseConfig("postgres://nobody:s3cr3t@127.0.0.1:1/nowhere?connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	m, err := migrator.New(cc, []migrator.Lane{fastLane}, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := app.New(m, app.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	h := r.Handler()
	if code, _ := httpGet(t, h, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz without a database: %d", code)
	}
	code, body := httpGet(t, h, "/lanes")
	var resp app.LanesResponse
	if err := json.Unmarshal([]byte(body), &resp); err != nil || code != http.StatusServiceUnavailable || resp.Error == "" || resp.Replica.Ready {
		t.Errorf("/lanes without a database: %d %s (%v)", code, body, err)
	}
	if strings.Contains(body, "s3cr3t") {
		t.Errorf("/lanes prints the password: %s", body)
	}
}
