package backoff

import (
	"context"
	"testing"
	"time"
)

func TestExponential(t *testing.T) {
	for n := range 80 {
		d := Exponential(n, 100*time.Millisecond, 5*time.Second)
		limit := min(100*time.Millisecond<<min(n, 30), 5*time.Second)
		if d <= 0 || d > limit {
			t.Fatalf("Exponential(%d) = %s, want (0, %s]", n, d, limit)
		}
	}
}

func TestJitter(t *testing.T) {
	for range 1000 {
		if d := Jitter(time.Second); d < 800*time.Millisecond || d > 1200*time.Millisecond {
			t.Fatalf("Jitter(1s) = %s", d)
		}
	}
	if Jitter(0) != 0 {
		t.Fatal("Jitter(0) != 0")
	}
}

func TestSleepEndsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Sleep(ctx, time.Hour); err != context.Canceled {
		t.Fatalf("Sleep = %v", err)
	}
	if err := Sleep(context.Background(), time.Millisecond); err != nil {
		t.Fatal(err)
	}
}
