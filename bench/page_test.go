package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/pgtest"
	"github.com/multilanes/lanes/migrator"
)

// Measurement 10: how soon the live page shows a change. One replica (app.Runtime) applies the
// slow lane's only migration, which runs until the end; an operator's pause or resume of the
// lane (Migrator.Pause/Resume: a committed row and a notification) is the change. Measured from
// just before the Pause/Resume call to:
//   - sse: each of S open /events streams receiving a state whose lane shows the new paused
//     flag (the replica's listener hears the notification, the replica reads the page's state
//     once for all streams, each stream sends it);
//   - poll: a client reading GET /lanes once a second (what a page without a live feed would
//     do, every open page costing one database read a second) seeing it.
//
// Each change comes at a random phase of the poller's second. The running migration announces
// its elapsed time once a second, so the streams also get a state a second without changes.
//
// Test server (TEST_DATABASE_URL), one fresh database.

func BenchmarkPageUpdateLatency(b *testing.B) {
	noteLoad("PageUpdateLatency")
	cc, err := pgx.ParseConfig(pgtest.NewDB(b))
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	m, err := migrator.New(cc, signalLanes(waitForever), migrator.Config{})
	if err != nil {
		b.Fatal(err)
	}
	r, err := app.New(m, app.Config{})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	if err := r.Start(ctx); err != nil {
		b.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(r.Handler())
	srv.Config.RegisterOnShutdown(r.StopEvents)
	srv.Start()
	defer srv.Close()
	admin, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		b.Fatal(err)
	}
	defer admin.Close(context.Background())
	if err := waitFor(ctx, time.Minute, "the slow lane running", func() (bool, error) {
		st, err := r.Status(ctx)
		return err == nil && st.Lanes[1].Locked, nil
	}); err != nil {
		b.Fatal(err)
	}

	var rows [][]string
	for _, streams := range []int{1, 10, 50} {
		b.Run(fmt.Sprintf("streams=%d", streams), func(b *testing.B) {
			sctx, stop := context.WithCancel(ctx)
			defer stop()
			seen := make(chan pausedAt, 1000)
			var wg sync.WaitGroup
			defer wg.Wait()
			defer stop()
			for i := range streams {
				req, _ := http.NewRequestWithContext(sctx, http.MethodGet, srv.URL+"/events", nil)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				wg.Go(func() {
					defer resp.Body.Close()
					followEvents(resp, i, seen)
				})
			}
			wg.Go(func() { pollLanes(sctx, srv.URL+"/lanes", seen) })
			var sse, poll []float64
			paused := false
			for range reps(20, 6) {
				// A random phase against the poller's second (a change right after a poll would
				// make it wait a whole interval every time).
				time.Sleep(time.Duration(rand.Int64N(int64(time.Second))))
				paused = !paused
				t0 := time.Now()
				if paused {
					err = m.Pause(ctx, admin, "slow")
				} else {
					err = m.Resume(ctx, admin, "slow")
				}
				if err != nil {
					b.Fatal(err)
				}
				got, polled := map[int]bool{}, false
				for len(got) < streams || !polled {
					select {
					case s := <-seen:
						if s.paused != paused || s.at.Before(t0) {
							continue
						}
						if s.poll {
							if !polled {
								polled = true
								poll = append(poll, ms(s.at.Sub(t0)))
							}
							continue
						}
						if !got[s.stream] {
							got[s.stream] = true
							sse = append(sse, ms(s.at.Sub(t0)))
						}
					case <-time.After(time.Minute):
						b.Fatalf("streams=%d: %d of %d streams and poll=%v saw paused=%v", streams, len(got), streams, polled, paused)
					}
				}
				// Drain: a stream may have sent the same state twice (another change's read).
				for len(seen) > 0 {
					<-seen
				}
			}
			b.ReportMetric(pct(sse, 50), "sse-p50-ms")
			b.ReportMetric(pct(poll, 50), "poll-p50-ms")
			rows = append(rows,
				[]string{strconv.Itoa(streams), "sse", strconv.Itoa(len(sse)), fmt.Sprintf("%.1f", pct(sse, 50)), fmt.Sprintf("%.1f", pct(sse, 99)), fmt.Sprintf("%.1f", maxOf(sse))},
				[]string{strconv.Itoa(streams), "poll /lanes 1/s", strconv.Itoa(len(poll)), fmt.Sprintf("%.1f", pct(poll, 50)), fmt.Sprintf("%.1f", pct(poll, 99)), fmt.Sprintf("%.1f", maxOf(poll))})
		})
	}
	table("Page update latency (ms) after a pause or resume", []string{"streams", "design", "samples", "p50", "p99", "max"}, rows)
}

// pausedAt is the slow lane's paused flag as one client saw it, and when.
type pausedAt struct {
	at     time.Time
	paused bool
	poll   bool
	stream int // which stream, unless poll
}

// followEvents reports the slow lane's paused flag from each "state" event of the stream.
func followEvents(resp *http.Response, stream int, seen chan<- pausedAt) {
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		at := time.Now()
		var msg struct {
			State struct {
				Lanes []migrator.LaneStatus `json:"lanes"`
			} `json:"state"`
		}
		if json.Unmarshal([]byte(data), &msg) == nil && len(msg.State.Lanes) == 2 {
			seen <- pausedAt{at: at, paused: msg.State.Lanes[1].Paused, stream: stream}
		}
	}
}

// pollLanes reads /lanes once a second and reports the slow lane's paused flag.
func pollLanes(ctx context.Context, url string, seen chan<- pausedAt) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			var st app.LanesResponse
			if json.NewDecoder(resp.Body).Decode(&st) == nil && len(st.Lanes) == 2 {
				seen <- pausedAt{at: time.Now(), paused: st.Lanes[1].Paused, poll: true}
			}
			resp.Body.Close()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
