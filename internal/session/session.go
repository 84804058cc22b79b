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
	"time"
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
		// One statement reads the server session's pid (see BehindPooler) and sets the settings.
		sql := "select pg_backend_pid()"
		if set := SQL(version, userSet); set != "" {
			sql += ", " + strings.TrimPrefix(set, "select ")
		}
		res, err := pgConn.Exec(ctx, sql).ReadAll()
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && !pgConn.IsClosed() {
			if hooks.SetFailed != nil {
				hooks.SetFailed(err)
			}
			res, err = pgConn.Exec(ctx, "select pg_backend_pid()").ReadAll()
		}
		if err != nil {
			return fmt.Errorf("set session settings: %w", err)
		}
		if len(res) == 1 && len(res[0].Rows) == 1 {
			if pid, err := strconv.ParseUint(string(res[0].Rows[0][0]), 10, 32); err == nil {
				pgConn.CustomData()[backendPIDKey] = uint32(pid)
				pgConn.CustomData()[behindPoolerKey] = uint32(pid) != pgConn.PID()
			}
		}
		return nil
	}
	return c
}

// SQL returns the one statement that sets the session settings a server of the given
// version has, leaving out those in skip; "" when there are none. set_config rather than SET:
// one statement, which a batch (extended protocol) can carry too.
func SQL(version int, skip map[string]bool) string { return settingsSQL(version, skip, false) }

// LocalSQL is SQL for the current transaction only (set_config's is_local): through a pooler in
// transaction mode, a transaction sets for itself what a session would keep.
func LocalSQL(version int, skip map[string]bool) string { return settingsSQL(version, skip, true) }

func settingsSQL(version int, skip map[string]bool, local bool) string {
	var parts []string
	for _, s := range sessionSettings {
		if version < s.minVersion || skip[s.name] {
			continue
		}
		parts = append(parts, fmt.Sprintf("set_config('%s', '%s', %t)", s.name, s.value, local))
	}
	if len(parts) == 0 {
		return ""
	}
	return "select " + strings.Join(parts, ", ")
}

// behindPoolerKey marks, in a connection's CustomData, a connection whose server session is not
// the one announced at connect time (BackendKeyData): a pooler such as PgBouncer answers with a
// key of its own. backendPIDKey holds the pg_backend_pid() read when it connected.
const (
	behindPoolerKey = "lanes.behind_pooler"
	backendPIDKey   = "lanes.backend_pid"
)

// BehindPooler reports whether pgConn, configured by Prepare, was found to go through a pooler
// when it connected; true also while that is not known yet (during the connection's set-up).
func BehindPooler(pgConn *pgconn.PgConn) bool {
	b, ok := pgConn.CustomData()[behindPoolerKey].(bool)
	return b || !ok
}

// BackendPID returns the server session's pid as read when pgConn connected (behind a pooler
// the pid announced at connect time is the pooler's), or pgConn.PID() when it was not read.
func BackendPID(pgConn *pgconn.PgConn) uint32 {
	if p, ok := pgConn.CustomData()[backendPIDKey].(uint32); ok {
		return p
	}
	return pgConn.PID()
}

// CancelHandler stops a statement whose context is done: with a cancel request on a server's
// own session, so a transaction rolls back cleanly and the connection stays usable; by breaking
// the connection behind a pooler, since a cancel request through PgBouncer 1.18 makes it exit
// ("bad client state") when the cancelling client disconnects first, as pgx's does. A broken
// connection makes the pooler close the server connection, which the server notices within
// client_connection_check_interval. Use it as pgconn's BuildContextWatcherHandler.
type CancelHandler struct {
	pgConn   *pgconn.PgConn
	cancel   pgconn.CancelRequestContextWatcherHandler
	deadline pgconn.DeadlineContextWatcherHandler
	pooled   bool // always break the connection
	broke    bool // HandleCancel broke rather than cancelled
}

// NewCancelHandler returns the handler for pgConn; pooled: never send a cancel request.
func NewCancelHandler(pgConn *pgconn.PgConn, pooled bool) *CancelHandler {
	return &CancelHandler{
		pgConn:   pgConn,
		cancel:   pgconn.CancelRequestContextWatcherHandler{Conn: pgConn, CancelRequestDelay: 0, DeadlineDelay: 5 * time.Second},
		deadline: pgconn.DeadlineContextWatcherHandler{Conn: pgConn.Conn(), DeadlineDelay: time.Second},
		pooled:   pooled,
	}
}

// HandleCancel is called when the context of a running statement is done.
func (h *CancelHandler) HandleCancel(ctx context.Context) {
	h.broke = h.pooled || BehindPooler(h.pgConn)
	if h.broke {
		h.deadline.HandleCancel(ctx)
		return
	}
	h.cancel.HandleCancel(ctx)
}

// HandleUnwatchAfterCancel is called when the statement ends after HandleCancel.
func (h *CancelHandler) HandleUnwatchAfterCancel() {
	if h.broke {
		h.deadline.HandleUnwatchAfterCancel()
		return
	}
	h.cancel.HandleUnwatchAfterCancel()
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
