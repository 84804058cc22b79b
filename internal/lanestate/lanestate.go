// Package lanestate holds what the runtime and the command line conclude from a lane's status
// and its announcements, in one place.
package lanestate

import (
	"time"

	"github.com/multilanes/lanes/internal/wire"
	"github.com/multilanes/lanes/migrator"
)

// BlockingFailure returns the recorded failure that stops lane l from reaching version want, or
// nil: a permanent failure of the lane's very next migration that no session is retrying right
// now (nobody holds the lane's lock), of a file this binary would run unchanged (same checksum)
// or does not know. A failure of a file this binary has changed does not block: this binary's
// deploy is the fix and will retry it.
func BlockingFailure(l migrator.LaneInfo, st migrator.LaneStatus, want int32) *migrator.Failure {
	f := st.Failure
	if f == nil || f.Transient || st.Locked || f.Version != st.Version+1 || f.Version > want {
		return nil
	}
	if int(f.Version) <= len(l.Migrations) && l.Migrations[f.Version-1].Checksum != f.Checksum {
		return nil
	}
	return f
}

// Progress returns the progress a notification announced for a lane's migration to version
// (file), as known at time at.
func Progress(h wire.ProgressHint, lane string, version int32, file string, at time.Time) *migrator.Progress {
	p := &migrator.Progress{Lane: lane, Version: version, File: file, Done: h.Done, Total: h.Total, RatePerS: h.Rate, Throttled: h.Throttled, Phase: h.Phase, UpdatedAt: at}
	if h.Phase != "" {
		e := h.Elapsed
		p.ElapsedSeconds = &e
	}
	p.Percent, p.ETASeconds = wire.PercentETA(p.Done, p.Total, p.RatePerS)
	return p
}
