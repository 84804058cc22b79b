package app_test

import (
	"context"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/rs/zerolog"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

// chromium returns the path of a Chromium to drive: $LANES_CHROMIUM, or chromium on PATH. The
// test skips without one, unless LANES_TEST_REQUIRE_DB=1 (CI), where it fails.
func chromium(t *testing.T) string {
	if p := os.Getenv("LANES_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("LANES_TEST_REQUIRE_DB") == "1" {
		t.Fatal("chromium is not installed (apt-get install chromium); LANES_TEST_REQUIRE_DB=1 forbids skipping the page's browser test")
	}
	t.Skip("chromium is not installed (apt-get install chromium)")
	return ""
}

// pageView is what the browser test reads from the page.
type pageView struct {
	State   string `json:"state"`   // the backfill lane's data-state
	Value   string `json:"value"`   // its progress bar's value ("" without one)
	Marker  string `json:"marker"`  // set by the test after the load: gone after a reload
	Live    bool   `json:"live"`    // the page's event stream is connected
	Updates int    `json:"updates"` // events the page applied
}

const readPageView = `(() => {
  const lane = document.getElementById('lane-backfill');
  const bar = lane && lane.querySelector('progress');
  return {
    state: lane ? lane.dataset.state : '',
    value: bar && bar.hasAttribute('value') ? bar.getAttribute('value') : '',
    marker: window.lanesTestMarker || '',
    live: document.getElementById('live').classList.contains('on'),
    updates: Number(document.body.dataset.updates || 0),
  };
})()`

// TestLivePageInChromium opens the page of one of two replicas in a headless Chromium while the
// other (or the same) applies a batched backfill, and watches it without reloading: the
// progress bar advances as the replica's listener hears the progress announcements, then the
// lane turns done. The walk holds at batch 1 until the page is live, at batch 8 until the page
// shows some progress, and at batch 15 until it shows more (6 pauses of 200ms since batch 8
// guarantee an announcement in between, a second apart at most), so that the test sees the
// advance however slow the machine. Its batches aim at 5 s rather than 200 ms, so that the held
// batches and a loaded machine do not shrink them to a row each: the rest of the walk after the
// last hold then takes seconds, not minutes. The screenshot taken at batch 15 is written to the test's
// artifact directory (go test -artifacts -outputdir DIR) and, with LANES_UPDATE_SCREENSHOT=1,
// to docs/live-page.png.
func TestLivePageInChromium(t *testing.T) {
	exe := chromium(t)
	t.Parallel()
	e := newEnv(t)
	e.exec("create table items (id int8 primary key, n int not null default 0); insert into items (id) select generate_series(1, 2000); analyze items")
	w := newWalk(1, 8, 15)
	lanes := []migrator.Lane{fastLane, w.lane()}
	var replicas []*app.Runtime
	for range 2 {
		m, err := migrator.New(e.cc, lanes, migrator.Config{LockPollInterval: 20 * time.Millisecond, Batch: migrator.BatchConfig{Pause: 200 * time.Millisecond, Target: 5 * time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		r, err := app.New(m, app.Config{Logger: zerolog.New(os.Stderr).Level(zerolog.InfoLevel), TakeoverInterval: time.Second, Notifier: notifier.Config{PingInterval: time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
		err = r.Start(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		replicas = append(replicas, r)
	}
	w.waitReached(t, 1)
	srv := httptest.NewUnstartedServer(replicas[1].Handler())
	srv.Config.RegisterOnShutdown(replicas[1].StopEvents)
	srv.Start()
	defer srv.Close()

	actx, cancelAlloc := chromedp.NewExecAllocator(t.Context(),
		chromedp.ExecPath(exe),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.WindowSize(1200, 1000),
	)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()
	// The browser lives as long as bctx: each step gets its own hang guard instead.
	step := func() context.Context {
		ctx, cancel := context.WithTimeout(bctx, 2*time.Minute)
		t.Cleanup(cancel)
		return ctx
	}
	if err := chromedp.Do(bctx, chromedp.Navigate(srv.URL+"/"), chromedp.WaitVisible(chromedp.CSS("#lane-backfill"))); err != nil {
		t.Fatalf("open the page: %v", err)
	}
	read := func() pageView {
		t.Helper()
		v, err := chromedp.Run(step(), chromedp.Evaluate[pageView](readPageView))
		if err != nil {
			t.Fatalf("read the page: %v", err)
		}
		return v
	}
	waitFor := func(what string, cond func(pageView) bool) pageView {
		t.Helper()
		deadline := time.Now().Add(5 * time.Minute) // a hang guard
		v := read()
		for !cond(v) {
			if time.Now().After(deadline) {
				t.Fatalf("the page: %s: not within 5m; it shows %+v", what, v)
			}
			time.Sleep(50 * time.Millisecond)
			v = read()
		}
		return v
	}
	if err := chromedp.Do(step(), chromedp.Evaluate[chromedp.Void](`window.lanesTestMarker = 'loaded once'`)); err != nil {
		t.Fatal(err)
	}
	first := waitFor("live, the backfill running", func(v pageView) bool { return v.Live && v.State == "running" })
	t.Logf("page live: %+v", first)
	percent := func(v pageView) float64 {
		f, err := strconv.ParseFloat(v.Value, 64)
		if err != nil {
			return -1
		}
		return f
	}

	close(w.hold[1])
	w.waitReached(t, 8)
	some := waitFor("some progress", func(v pageView) bool { return v.State == "running" && percent(v) > 0 })
	close(w.hold[8])
	w.waitReached(t, 15)
	more := waitFor("more progress", func(v pageView) bool { return v.State == "running" && percent(v) > percent(some) })
	if more.Marker != "loaded once" || more.Updates <= first.Updates {
		t.Fatalf("the page was reloaded or got no events: first %+v, then %+v", first, more)
	}
	t.Logf("progress advanced without a reload: %s %% then %s %% (%d events applied)", some.Value, more.Value, more.Updates)
	shot, err := chromedp.Run(step(), chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	saveScreenshot(t, "live-page.png", shot)

	close(w.hold[15])
	done := waitFor("the lane done", func(v pageView) bool { return v.State == "done" })
	if done.Marker != "loaded once" || done.Value != "" {
		t.Fatalf("the done lane: %+v", done)
	}
	if shot, err = chromedp.Run(step(), chromedp.FullScreenshot(100)); err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	saveScreenshot(t, "live-page-done.png", shot)
}

// saveScreenshot writes a PNG to the test's artifact directory and, for live-page.png with
// LANES_UPDATE_SCREENSHOT=1, to the repository's docs.
func saveScreenshot(t *testing.T, name string, png []byte) {
	t.Helper()
	paths := []string{filepath.Join(t.ArtifactDir(), name)}
	if os.Getenv("LANES_UPDATE_SCREENSHOT") == "1" && name == "live-page.png" {
		paths = append(paths, filepath.Join("..", "docs", name))
	}
	for _, p := range paths {
		if err := os.WriteFile(p, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot: %s", p)
	}
}
