// Package testkit holds the helpers that the tests of every package share: waiting for a
// condition, writing a folder of files, and in-memory files. It is imported by tests only.
package testkit

import (
	"os"
	"path/filepath"
	"testing"
	"testing/fstest"
	"time"
)

// Eventually polls cond every few milliseconds until it holds, and fails the test, naming
// what, if it does not within the given time. It is for conditions that no event announces;
// where a channel or a callback says it, wait on that instead.
func Eventually(t testing.TB, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// WriteTree creates files (slash-separated paths relative to a new temporary folder, removed
// when the test ends) and returns the folder.
func WriteTree(t testing.TB, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// File is an in-memory file holding s, for fstest.MapFS lanes.
func File(s string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(s)} }
