package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestReadmeLibraryExampleCompiles builds the README's library example as written: the first Go
// block under "## Library" is a whole program, with the migrations folder its embed directive
// names.
func TestReadmeLibraryExampleCompiles(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "\n## Library\n")
	if !ok {
		t.Fatal(`README.md has no "## Library" section`)
	}
	_, code, ok := strings.Cut(section, "```go\n")
	if !ok {
		t.Fatal(`README.md's "## Library" section has no Go block`)
	}
	code, _, ok = strings.Cut(code, "```")
	if !ok {
		t.Fatal("README.md's library example is not closed")
	}
	// A folder inside the module (so that its imports resolve to this module), starting with a
	// dot so that ./... never sees it.
	dir, err := os.MkdirTemp(".", ".readme-example-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	files := map[string]string{
		"main.go":                              code,
		"migrations/fast/001_create_users.sql": "create table users (id bigint primary key, email text not null, email_lower text);",
		"migrations/slow/001_index.sql":        "create index users_email_idx on users (email);",
	}
	for name, content := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, args := range [][]string{{"build", "-o", os.DevNull}, {"vet"}} {
		cmd := exec.Command("go", append(args, "./"+filepath.Base(dir))...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go %s of the README's library example: %v\n%s", args[0], err, out)
		}
	}
}

// TestLogDurationsAreSeconds keeps the logs' convention: a duration field is seconds, named
// with "_s" (the console shows it with its unit), never zerolog's Dur (milliseconds by default,
// without a unit).
func TestLogDurationsAreSeconds(t *testing.T) {
	t.Parallel()
	out, err := exec.Command("git", "grep", "-n", "-E", `\.Dur\(|\.Durs\(`, "--", "*.go", ":!*_test.go").CombinedOutput()
	if err == nil {
		t.Fatalf("log fields with zerolog's Dur: use Float64(\"name_s\", d.Seconds()):\n%s", out)
	}
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("git grep: %v\n%s", err, out)
	}
}
