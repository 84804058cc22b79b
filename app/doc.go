// Package app is the runtime a service embeds to use migration lanes.
//
// A Runtime LISTENs for lane events on one dedicated connection, applies the blocking lanes in
// Start (so the replica reports ready only once they are applied), then applies the background
// lanes in goroutines it owns on whichever replica wins each lane's lock. Every replica learns
// of a lane's progress through the listener and re-reads the version tables before believing
// it, so a feature can wait for a lane with Done, IsDone, Wait or WaitVersion.
//
// Handler serves what an orchestrator and an operator need: probes, the lanes as JSON,
// Prometheus metrics, and a live page (server-rendered HTML with a small embedded script) that
// follows the replica's notifications through Server-Sent Events.
//
// Lifecycle: New (no I/O), Start (fails fast, returns once ready), Close (idempotent; cancels a
// Start in progress and the background lanes, and waits for them at most Config.CloseTimeout,
// 15s by default, so a migration that ignores its context cannot hang a shutdown). All methods
// are safe for concurrent use.
package app
