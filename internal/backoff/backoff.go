// Package backoff computes and sleeps the waits between retries: capped exponential backoff
// with full jitter, a ±20 % jitter for periodic polls, and a sleep that ends with its context.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Exponential returns the wait before retry n (from 0): a random duration in (0, d] where d is
// min doubled n times, capped at max ("full jitter").
func Exponential(n int, min, max time.Duration) time.Duration {
	d := min << (n & 31)
	if n > 30 || d > max || d <= 0 {
		d = max
	}
	if d <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(d)) + 1)
}

// Jitter returns d changed by up to ±20 %, so that replicas started together do not poll in step.
func Jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return d
	}
	return d - d/5 + time.Duration(rand.Int64N(int64(d)*2/5+1))
}

// Sleep waits for d or until ctx is done, and returns ctx's error in that case.
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
