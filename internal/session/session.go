// Package session configures the connections multi-lanes opens: the startup parameters every
// server and pooler accept, and the session settings a server supports, set after connecting.
package session

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"unicode"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// sessionSetting is a per-session setting multi-lanes relies on. It is set after the connection
// is made, never sent as a startup parameter: a server older than minVersion refuses a
// connection whose startup packet names it (42704), and a pooler such as PgBouncer refuses every
// startup parameter it does not track ("unsupported startup parameter").
type sessionSetting struct {
	name, value string
	minVersion  int // the first server_version_num that has it
}

// sessionSettings are set on every connection Prepare configures.
var sessionSettings = []sessionSetting{
	// The server checks every second whether the client of a running statement is still there,
	// so a killed replica's session, and the lane lock it holds, ends within about a second
	// instead of when its running statement finishes.
	{"client_connection_check_interval", "1000", 140000},
	// Server-side TCP keepalives: a session cut off by a network partition (no FIN, no RST)
	// ends, and frees its lane lock, after about 10 + 3 × 5 = 25 s.
	{"tcp_keepalives_idle", "10", 0},
	{"tcp_keepalives_interval", "5", 0},
	{"tcp_keepalives_count", "3", 0},
}

// DeadClientCheckVersion is the server_version_num from which PostgreSQL has
// client_connection_check_interval (PostgreSQL 14). On an older server a killed client's session
// lives on until its running statement ends.
const DeadClientCheckVersion = 140000

// Hooks receives what Prepare's after-connect step finds out. Each field may be
// nil. They are called on the connecting goroutine, once per connection.
type Hooks struct {
	// NoDeadClientCheck is called when the server (server_version_num given) has no
	// client_connection_check_interval and the connection configuration does not set it.
	NoDeadClientCheck func(serverVersion int)
	// SetFailed is called when the server refused the settings (the connection is kept: the
	// settings only shorten how long a dead client's lock lives).
	SetFailed func(err error)
}

// DefaultApplicationName is the application_name multi-lanes's connections carry unless the
// connection configuration sets one: lanes/<host>/<pid>, so that pg_stat_activity and the lock
// holder shown by status name the replica.
func DefaultApplicationName() string {
	host, _ := os.Hostname()
	if host == "" {
		host = "unknown"
	}
	name := fmt.Sprintf("lanes/%s/%d", host, os.Getpid())
	if len(name) > 63 { // NAMEDATALEN - 1: the server would cut it anyway, keep the pid
		pid := fmt.Sprintf("/%d", os.Getpid())
		name = name[:63-len(pid)] + pid
	}
	return name
}

// Prepare returns a copy of c configured the way multi-lanes needs. The only startup
// parameter it adds is application_name (DefaultApplicationName, when c sets none), which every
// supported server and PgBouncer accept. Once connected, it sets with one statement the session
// settings the server supports, decided by its version (server_version_num): on PostgreSQL 14
// and later client_connection_check_interval=1000, so that a killed client's session, and the
// lane lock it holds, ends within about a second instead of when its running statement
// finishes; on every version server-side TCP keepalives (idle 10 s, interval 5 s, count 3), so
// that a session cut off by a network partition ends within about 25 s. A setting that c already
// carries as a runtime parameter is left as c sets it. An AfterConnect hook of c runs first.
func Prepare(c *pgx.ConnConfig, hooks Hooks) *pgx.ConnConfig {
	c = c.Copy()
	if c.RuntimeParams == nil {
		c.RuntimeParams = map[string]string{}
	}
	if c.RuntimeParams["application_name"] == "" {
		c.RuntimeParams["application_name"] = DefaultApplicationName()
	}
	userSet := map[string]bool{}
	for k := range c.RuntimeParams {
		userSet[strings.ToLower(k)] = true
	}
	prev := c.AfterConnect
	c.AfterConnect = func(ctx context.Context, pgConn *pgconn.PgConn) error {
		if prev != nil {
			if err := prev(ctx, pgConn); err != nil {
				return err
			}
		}
		version, err := ServerVersion(ctx, pgConn)
		if err != nil {
			return err
		}
		if version < DeadClientCheckVersion && !userSet["client_connection_check_interval"] && hooks.NoDeadClientCheck != nil {
			hooks.NoDeadClientCheck(version)
		}
		sql := SQL(version, userSet)
		if sql == "" {
			return nil
		}
		_, err = pgConn.Exec(ctx, sql).ReadAll()
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && !pgConn.IsClosed() {
			if hooks.SetFailed != nil {
				hooks.SetFailed(err)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("set session settings: %w", err)
		}
		return nil
	}
	return c
}

// SQL returns the one statement that sets the session settings a server of the given
// version has, leaving out those in skip; "" when there are none. set_config rather than SET:
// one statement, which a batch (extended protocol) can carry too.
func SQL(version int, skip map[string]bool) string {
	var parts []string
	for _, s := range sessionSettings {
		if version < s.minVersion || skip[s.name] {
			continue
		}
		parts = append(parts, fmt.Sprintf("set_config('%s', '%s', false)", s.name, s.value))
	}
	if len(parts) == 0 {
		return ""
	}
	return "select " + strings.Join(parts, ", ")
}

// ServerVersion returns the server's version as server_version_num (150010 for 15.10), read from
// the server_version the server reports at connect time, or queried when that is missing or
// unreadable (a pooler may report its own).
func ServerVersion(ctx context.Context, pgConn *pgconn.PgConn) (int, error) {
	if v := parseServerVersion(pgConn.ParameterStatus("server_version")); v > 0 {
		return v, nil
	}
	res, err := pgConn.Exec(ctx, "show server_version_num").ReadAll()
	if err != nil {
		return 0, fmt.Errorf("read server_version_num: %w", err)
	}
	if len(res) == 1 && len(res[0].Rows) == 1 && len(res[0].Rows[0]) == 1 {
		if v, err := strconv.Atoi(string(res[0].Rows[0][0])); err == nil {
			return v, nil
		}
	}
	return 0, errors.New("read server_version_num: unexpected answer")
}

// parseServerVersion turns a server_version such as "13.23", "15.10 (Debian 15.10-0+deb12u1)",
// "18beta1" or "9.6.24" into server_version_num form; 0 when it cannot.
func parseServerVersion(s string) int {
	nums := []int{}
	cur, in := 0, false
	for _, r := range s {
		if unicode.IsDigit(r) {
			cur, in = cur*10+int(r-'0'), true
			continue
		}
		if in {
			nums = append(nums, cur)
			cur, in = 0, false
		}
		if r != '.' || len(nums) >= 3 {
			break
		}
	}
	if in {
		nums = append(nums, cur)
	}
	switch {
	case len(nums) == 0 || nums[0] == 0:
		return 0
	case nums[0] >= 10:
		minor := 0
		if len(nums) > 1 {
			minor = nums[1]
		}
		return nums[0]*10000 + minor
	default:
		v := nums[0] * 10000
		if len(nums) > 1 {
			v += nums[1] * 100
		}
		if len(nums) > 2 {
			v += nums[2]
		}
		return v
	}
}
