package app_test

import (
	"context"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/multilanes/lanes/internal/testkit"
	"github.com/multilanes/lanes/migrator"
)

// GET /lanes, which anyone who reaches the replica may read, shows a failed migration's error
// with its string literals masked: a failing `alter role ... password '...'` does not show the
// password there.
func TestLanesEndpointMasksLiterals(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const secret = "S3cret-Passw0rd"
	lane := migrator.Lane{Name: "slow", Mode: migrator.Background, FS: fstest.MapFS{
		"001_role.sql": testkit.File("alter role lanes_no_such_role_y password '" + secret + "';"),
	}}
	m, err := migrator.New(e.cc, []migrator.Lane{lane}, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := m.Migrate(ctx, "slow"); err == nil || !strings.Contains(err.Error(), secret) {
		t.Fatalf("the failure should quote its statement to the operator: %v", err)
	}
	r := e.runtime(lane)
	code, body := httpGet(t, r.Handler(), "/lanes")
	if code != 200 || strings.Contains(body, secret) {
		t.Fatalf("/lanes shows the password: %d %s", code, body)
	}
	resp := lanesOf(t, r.Handler())
	if len(resp.Lanes) != 1 || resp.Lanes[0].State != migrator.StateFailed || !strings.Contains(resp.Lanes[0].Error, "lanes_no_such_role_y") ||
		resp.Lanes[0].Failure == nil || !strings.Contains(resp.Lanes[0].Failure.Statement, "alter role") {
		t.Fatalf("/lanes should still say what failed: %+v", resp.Lanes)
	}
	// Runtime.Status, for the service's own code, keeps the text.
	st, err := r.Status(ctx)
	if err != nil || !strings.Contains(st.Lanes[0].Error, secret) {
		t.Fatalf("Status = %+v, %v", st.Lanes, err)
	}
}

// A replica whose files differ from what was applied (here a renamed file, the lane up to date)
// shows the lane in state drift on /lanes, naming the file.
func TestLanesEndpointShowsDrift(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	applied := migrator.Lane{Name: "fast", FS: fstest.MapFS{"001_create.sql": testkit.File("create table example (id int);")}}
	m, err := migrator.New(e.cc, []migrator.Lane{applied}, migrator.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := m.Migrate(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	renamed := migrator.Lane{Name: "fast", FS: fstest.MapFS{"001_make_example.sql": testkit.File("create table example (id int);")}}
	resp := lanesOf(t, e.runtime(renamed).Handler())
	if len(resp.Lanes) != 1 || resp.Lanes[0].State != migrator.StateDrift || len(resp.Lanes[0].Drift) != 1 ||
		!strings.Contains(resp.Lanes[0].Drift[0], "001_create.sql") {
		t.Fatalf("/lanes = %+v, want the lane in state drift naming 001_create.sql", resp.Lanes)
	}
}
