package cli

import (
	"errors"
	"flag"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

// globals holds the global flags as given on the command line.
type globals struct {
	databaseURL, migrations, lanes, channel, logFormat string
}

// register defines the global flags on fs. The current values are the defaults, so defining
// them on a command's FlagSet keeps what the global FlagSet parsed.
func (g *globals) register(fs *flag.FlagSet) {
	fs.StringVar(&g.databaseURL, "database-url", g.databaseURL,
		"`URL` or keyword/value string (env DATABASE_URL); unset: libpq defaults\n(PGHOST, PGPORT, PGUSER, ..., local socket)")
	fs.StringVar(&g.migrations, "migrations", g.migrations,
		"`folder` holding one subfolder per lane (env LANES_MIGRATIONS); required by\nmigrate, status, wait, serve and new (only demo uses the embedded demo\nmigrations)")
	fs.StringVar(&g.lanes, "lanes", g.lanes,
		"lanes in order as name:mode[:version_table],... with mode blocking or\nbackground (env LANES_LANES; default fast:blocking,slow:background;\nversion_table default lanes_<name>_version, optionally schema.table)")
	fs.StringVar(&g.channel, "channel", g.channel, "NOTIFY `channel` (env LANES_CHANNEL; default lanes_done)")
	fs.StringVar(&g.logFormat, "log-format", g.logFormat,
		"json or console (env LANES_LOG_FORMAT; default: console when stderr is a\nterminal, json otherwise)")
}

// settings are the global settings once flags and environment variables are resolved.
type settings struct {
	databaseURL string // "" means libpq defaults
	migrations  string // "" means none given: a usage error for every command but demo
	lanes       string
	channel     string
	logFormat   string // "json" or "console"
}

// resolve takes each global from its flag when the flag was given (set lists the flags given),
// else from its environment variable.
func (g *globals) resolve(getenv func(string) string, set map[string]bool, terminal bool) (settings, error) {
	pick := func(name, value, envName string) string {
		if set[name] {
			return value
		}
		return getenv(envName)
	}
	s := settings{
		databaseURL: pick("database-url", g.databaseURL, "DATABASE_URL"),
		migrations:  pick("migrations", g.migrations, "LANES_MIGRATIONS"),
		lanes:       pick("lanes", g.lanes, "LANES_LANES"),
		channel:     pick("channel", g.channel, "LANES_CHANNEL"),
		logFormat:   strings.ToLower(strings.TrimSpace(pick("log-format", g.logFormat, "LANES_LOG_FORMAT"))),
	}
	switch s.logFormat {
	case "json", "console":
	case "":
		s.logFormat = "json"
		if terminal {
			s.logFormat = "console"
		}
	default:
		return s, usageErrorf("invalid log format %q: want json or console", s.logFormat)
	}
	if s.channel == "" {
		s.channel = migrator.DefaultChannel
	}
	return s, nil
}

// tuning is what the LANES_*_INTERVAL environment variables set; zero fields keep the
// defaults of app.Config and notifier.Config.
type tuning struct {
	takeover, ping, poll, relisten time.Duration
	keepListening                  bool // LANES_KEEP_LISTENING
}

// tuning reads the LANES_*_INTERVAL environment variables of serve and wait.
func (c *command) tuning() (tuning, error) {
	var tu tuning
	for _, v := range []struct {
		name string
		dst  *time.Duration
	}{
		{"LANES_TAKEOVER_INTERVAL", &tu.takeover},
		{"LANES_PING_INTERVAL", &tu.ping},
		{"LANES_POLL_INTERVAL", &tu.poll},
		{"LANES_RELISTEN_INTERVAL", &tu.relisten},
	} {
		s := strings.TrimSpace(c.env.getenv(v.name))
		if s == "" {
			continue
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			return tu, usageErrorf("invalid %s=%q: want a duration such as 500ms or 2s", v.name, s)
		}
		*v.dst = d
	}
	switch s := strings.TrimSpace(c.env.getenv("LANES_KEEP_LISTENING")); strings.ToLower(s) {
	case "", "0", "false", "no", "off":
	case "1", "true", "yes", "on":
		tu.keepListening = true
	default:
		return tu, usageErrorf("invalid LANES_KEEP_LISTENING=%q: want 1 or 0", s)
	}
	return tu, nil
}

// notifierConfig returns the LISTEN settings of the tuning variables.
func (tu tuning) notifierConfig() notifier.Config {
	return notifier.Config{PingInterval: tu.ping, PollInterval: tu.poll, RelistenInterval: tu.relisten}
}

// lanesFlag collects a repeatable --lane flag.
type lanesFlag []string

func (f *lanesFlag) String() string { return strings.Join(*f, ",") }
func (f *lanesFlag) Set(v string) error {
	*f = append(*f, v)
	return nil
}

// parseInterspersed parses flags that may come before, between or after positional arguments,
// and returns the positional ones. Everything after "--" is positional.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, nil
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(positional, rest...), nil
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

// durationValue is a time.Duration flag whose error says how to write one: "--timeout 5" is
// refused with "use a unit, such as 5s".
type durationValue time.Duration

func (d *durationValue) String() string { return time.Duration(*d).String() }
func (d *durationValue) Set(s string) error {
	v, err := time.ParseDuration(s)
	if err != nil {
		if _, nerr := strconv.ParseFloat(s, 64); nerr == nil {
			return fmt.Errorf("use a unit, such as %ss or %sm", s, s)
		}
		return errors.New("want a duration such as 30s, 5m or 1h30m")
	}
	*d = durationValue(v)
	return nil
}
