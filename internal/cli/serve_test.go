package cli

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/testkit"
)

// get returns the status code and body of a GET, or -1 and the error text.
func get(client *http.Client, url string) (int, string) {
	resp, err := client.Get(url)
	if err != nil {
		return -1, err.Error()
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return -1, err.Error()
	}
	return resp.StatusCode, string(b)
}

func TestServe(t *testing.T) {
	t.Parallel()
	// The fast lane reads a table the test keeps locked, so the replica stays not ready until
	// the test lets it go.
	vars := dbVars(t, map[string]string{
		"fast/001_gate.sql": "select count(*) from gate;",
		"slow/001_s.sql":    "create table s (i int);",
	})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	gateConn, err := pgx.Connect(ctx, vars["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	defer gateConn.Close(context.Background())
	if _, err := gateConn.Exec(ctx, "create table gate (i int)"); err != nil {
		t.Fatal(err)
	}
	gate, err := gateConn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer gate.Rollback(context.Background())
	if _, err := gate.Exec(ctx, "lock table gate in access exclusive mode"); err != nil {
		t.Fatal(err)
	}

	serveCtx, stop := context.WithCancel(ctx)
	defer stop()
	e, _, stderr := testEnv(vars)
	addrs := make(chan net.Addr, 1)
	e.onListen = func(a net.Addr) { addrs <- a }
	done := make(chan int, 1)
	go func() { done <- run(serveCtx, []string{"serve", "--addr", "127.0.0.1:0"}, e) }()
	finish := func() int {
		stop()
		select {
		case code := <-done:
			return code
		case <-time.After(30 * time.Second):
			t.Fatalf("serve did not stop within 30s:\n%s", stderr.String())
			return -1
		}
	}

	var base string
	select {
	case a := <-addrs:
		base = "http://" + a.String()
	case code := <-done:
		t.Fatalf("serve exited %d before listening:\n%s", code, stderr.String())
	case <-time.After(30 * time.Second):
		finish()
		t.Fatalf("serve never listened:\n%s", stderr.String())
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

	if code, body := get(client, base+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz while the blocking lane runs: %d %s", code, body)
	}
	if code, body := get(client, base+"/readyz"); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz while the blocking lane runs: want 503, got %d %s", code, body)
	}
	code, body := get(client, base+"/lanes")
	var st app.Status
	if err := json.Unmarshal([]byte(body), &st); code != http.StatusOK || err != nil || st.Replica.Ready || len(st.Lanes) != 2 {
		t.Errorf("/lanes while the blocking lane runs: %d %s (%v)", code, body, err)
	}

	if err := gate.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	ready := false
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if code, _ := get(client, base+"/readyz"); code == http.StatusOK {
			ready = true
			break
		}
	}
	if !ready {
		t.Fatalf("/readyz never answered 200:\n%s", stderr.String())
	}
	// The background lane follows; /lanes shows it done eventually.
	slowDone := false
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline) && !slowDone; time.Sleep(20 * time.Millisecond) {
		code, body := get(client, base+"/lanes")
		var st app.Status
		if code == http.StatusOK && json.Unmarshal([]byte(body), &st) == nil && st.Replica.Ready && len(st.Lanes) == 2 {
			slowDone = st.Lanes[0].Done() && st.Lanes[1].Done()
		}
	}
	if !slowDone {
		t.Errorf("/lanes never showed both lanes done:\n%s", stderr.String())
	}
	// The page at /, and its event stream, open while serve stops: the stream ends with the
	// server's graceful shutdown (http.Server.Shutdown alone would wait for it).
	if code, body := get(client, base+"/"); code != http.StatusOK || !strings.Contains(body, `id="lane-fast"`) || !strings.Contains(body, `id="lane-slow"`) {
		t.Errorf("GET /: %d %s", code, body)
	}
	stream, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Get(base + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Body.Close()
	first := make([]byte, 64)
	if n, err := io.ReadAtLeast(stream.Body, first, 5); err != nil || stream.StatusCode != http.StatusOK {
		t.Fatalf("GET /events: %d %q %v", stream.StatusCode, first[:n], err)
	}
	if code := finish(); code != ExitOK {
		t.Errorf("serve stopped by its context: want exit 0, got %d\n%s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), "stopped gracefully") {
		t.Errorf("serve did not log a graceful stop:\n%s", stderr.String())
	}
	if _, err := io.Copy(io.Discard, stream.Body); err != nil {
		t.Errorf("the event stream did not end cleanly: %v", err)
	}
}

func TestServeBlockingLaneFails(t *testing.T) {
	t.Parallel()
	vars := dbVars(t, map[string]string{"fast/001_bad.sql": "select * from missing_table;", "slow/001_s.sql": "select 1;"})
	res := runCLI(t, vars, "serve", "--addr", "127.0.0.1:0")
	if res.code != ExitError || !strings.Contains(res.stderr, "001_bad.sql") {
		t.Errorf("serve with a failing blocking lane: want exit %d naming the file, got %v", ExitError, res)
	}
}

func TestServeAddressInUse(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dir := testkit.WriteTree(t, map[string]string{"fast/001_a.sql": "select 1;"})
	vars := map[string]string{"LANES_ADDR": ln.Addr().String(), "DATABASE_URL": "postgres://nobody@127.0.0.1:1/none", "LANES_MIGRATIONS": dir}
	if res := runCLI(t, vars, "serve"); res.code != ExitError || !strings.Contains(res.stderr, ln.Addr().String()) {
		t.Errorf("serve on a busy address from LANES_ADDR: %v", res)
	}
}
