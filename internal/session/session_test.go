package session

import (
	"strings"
	"testing"
)

func TestParseServerVersion(t *testing.T) {
	for in, want := range map[string]int{
		"13.23":                          130023,
		"15.10 (Debian 15.10-0+deb12u1)": 150010,
		"18beta1":                        180000,
		"9.6.24":                         90624,
		"":                               0,
		"PgBouncer":                      0,
	} {
		if got := parseServerVersion(in); got != want {
			t.Errorf("parseServerVersion(%q) = %d, want %d", in, got, want)
		}
	}
}

func TestSQLLeavesOutWhatTheServerLacksAndWhatTheUserSet(t *testing.T) {
	if got := SQL(130000, nil); got == "" || strings.Contains(got, "client_connection_check_interval") {
		t.Errorf("SQL for 13 = %q: want keepalives only", got)
	}
	if got := SQL(150000, nil); !strings.Contains(got, "client_connection_check_interval") {
		t.Errorf("SQL for 15 = %q: want the dead-client check", got)
	}
	skip := map[string]bool{"client_connection_check_interval": true, "tcp_keepalives_idle": true, "tcp_keepalives_interval": true, "tcp_keepalives_count": true}
	if got := SQL(150000, skip); got != "" {
		t.Errorf("SQL with every setting set by the user = %q, want none", got)
	}
}
