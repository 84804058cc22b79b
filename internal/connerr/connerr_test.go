package connerr

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestCompactSaysARefusalOnce(t *testing.T) {
	// A port nobody listens on: pgx tries TLS, then plain, and lists both refusals.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().(*net.TCPAddr)
	ln.Close()
	_, err = pgconn.Connect(context.Background(), fmt.Sprintf("postgres://u@127.0.0.1:%d/db?sslmode=prefer&connect_timeout=5", addr.Port))
	if err == nil {
		t.Fatal("connected to a closed port")
	}
	wrapped := fmt.Errorf("lane %q: connect: %w", "fast", err)
	if strings.Count(wrapped.Error(), "connection refused") < 2 {
		t.Fatalf("pgx no longer repeats the refusal, so Compact has nothing to do: %v", wrapped)
	}
	got := Compact(wrapped)
	if n := strings.Count(got.Error(), "connection refused"); n != 1 {
		t.Errorf("compacted: %d refusals, want 1:\n%s", n, got)
	}
	var ce *pgconn.ConnectError
	if !errors.As(got, &ce) || !strings.HasPrefix(got.Error(), `lane "fast": connect:`) {
		t.Errorf("compacted error lost its chain or its context: %v", got)
	}
	if other := errors.New("x\nx"); Compact(other) != other {
		t.Error("an error that is not a connection error was changed")
	}
}
