// Package bench holds the benchmarks of multi-lanes against the alternatives it replaces
// (batched backfills against one UPDATE included):
// start-up during a slow migration (tern's Migrator for both lanes), signal latency and idle
// cost (polling the version table once a second), apply overhead (tern's Migrator on its own)
// and how each grows with replicas and migrations.
//
// Everything is in _test.go files, so the benchmarks compile with `go test ./...` but run only
// when asked:
//
//	go test ./bench -run '^$' -bench . -benchtime 1x -timeout 30m
//
// Add -short (or LANES_BENCH_QUICK=1) for a quick run with fewer repetitions and shorter
// windows. Each benchmark repeats its measurement internally and reports medians with their
// spread, so -count is not needed. See BENCHMARKS.md at the root for the figures and what they
// mean.
//
// Start-up and apply overhead run on the test server chosen by internal/pgtest
// (TEST_DATABASE_URL, ...). Signal latency and idle cost need more than a thousand connections,
// pg_stat_statements and track_commit_timestamp, so they start a throwaway cluster with
// internal/pgcluster (the PostgreSQL server binaries must be installed).
package bench
