package app_test

import (
	"context"
	"testing"
	"time"

	"github.com/multilanes/lanes/app"
	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/notifier"
)

// A replica whose lanes are all done closes its listener; a WaitVersion for a version not yet
// reached (a newer deploy's) connects it again until the version arrives, then it closes again;
// Listen keeps it connected until released. Before, the listener stayed connected for ever.
func TestListenerOnlyWhileSomethingWaits(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	g := newGate()
	close(g.release)
	r := e.replica(fastLane, slowLane(g))
	waitDone(t, r, "slow")
	mode := func() notifier.Delivery { return r.View().Listener }
	testkit.Eventually(t, "the listener closes once every lane is done", time.Minute, func() bool { return mode() == app.DeliveryIdle })

	waited := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		waited <- r.WaitVersion(ctx, "slow", 3)
	}()
	testkit.Eventually(t, "the listener connects again for the wait", time.Minute, func() bool { return mode() == notifier.DeliveryListening })
	// A newer deploy applies version 3 and announces it, as the migrator does.
	e.exec(`begin; update lanes_slow_version set version = 3;
select pg_notify('lanes_done', '{"lane":"slow","version":3,"state":"done"}'); commit`)
	select {
	case err := <-waited:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("WaitVersion did not return after version 3 was announced")
	}
	testkit.Eventually(t, "the listener closes again", time.Minute, func() bool { return mode() == app.DeliveryIdle })

	release := r.Listen()
	testkit.Eventually(t, "Listen connects the listener", time.Minute, func() bool { return mode() == notifier.DeliveryListening })
	release()
	release()
	testkit.Eventually(t, "and release closes it", time.Minute, func() bool { return mode() == app.DeliveryIdle })
}
