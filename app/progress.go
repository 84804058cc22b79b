package app

import (
	"context"

	"github.com/multilanes/lanes/internal/lanestate"
	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

// Progress returns the running batched migration of the lane as this replica last learned it:
// from the applier's announcements (at most one a second per lane, so at most about a second
// old while they arrive), or from the last read of the progress table (on every connect and
// poll). It returns nil while no batched migration of the lane runs, and for an unknown lane.
// It costs no query.
func (r *Runtime) Progress(lane string) *migrator.Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.state[lane]
	if !ok || s.status.Progress == nil {
		return nil
	}
	p := *s.status.Progress
	return &p
}

// Paused reports whether an operator paused the lane, as this replica last learned it.
func (r *Runtime) Paused(lane string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.state[lane]
	return ok && s.status.Paused
}

// setProgress stores a progress announcement. A hint for a version already applied is stale.
func (r *Runtime) setProgress(ev wire.Event) {
	info, _ := r.m.Lane(ev.Lane)
	file := ""
	if ev.Version >= 1 && int(ev.Version) <= len(info.Migrations) {
		file = info.Migrations[ev.Version-1].Name
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.state[ev.Lane]
	if ev.Version <= s.status.Version {
		return
	}
	p := lanestate.Progress(*ev.Progress, ev.Lane, ev.Version, file, r.cfg.Now())
	if old := s.status.Progress; old != nil && old.Version == ev.Version {
		p.StartedAt, p.BatchSize, p.Health = old.StartedAt, old.BatchSize, old.Health
	}
	s.status.Progress = p
}

// waitForResume waits while the lane is paused (a resume is announced), re-checking after
// TakeoverInterval in case the announcement was missed.
func (r *Runtime) waitForResume(ctx context.Context, lane string) error {
	return r.waitWhile(ctx, lane, func(st migrator.LaneStatus) bool { return st.Paused && !st.Done() })
}
