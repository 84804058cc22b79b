package migrator

import (
	"fmt"
	"regexp"
	"strings"
)

// LintWarning is a risky pattern found in a migration file by Lint.
type LintWarning struct {
	Lane    string `json:"lane"`
	File    string `json:"file"`
	Line    int    `json:"line"` // 1-based line of the rendered file where the statement starts
	Rule    string `json:"rule"`
	Message string `json:"message"`
}

func (w LintWarning) String() string {
	return fmt.Sprintf("lane %q: %s:%d: %s (%s)", w.Lane, w.File, w.Line, w.Message, w.Rule)
}

// The rules of Lint.
const (
	LintIndexNotConcurrent = "index-not-concurrent" // create index without concurrently on an existing table, in a blocking lane
	LintIndexNotRerunnable = "index-not-rerunnable" // disable-tx create index concurrently without drop index concurrently if exists first
	LintIndexInTransaction = "index-concurrently-in-transaction"
	LintNoLockTimeout      = "no-lock-timeout" // an ACCESS EXCLUSIVE lock in a blocking lane without lock_timeout
	LintSet                = "set"             // SET in a file: reset after every migration
)

var (
	lintSpace       = regexp.MustCompile(`\s+`)
	lintCreateTable = regexp.MustCompile(`^create (?:(?:global |local )?(?:temporary |temp )|unlogged )?table (?:if not exists )?([\w."$]+)`)
	lintCreateIndex = regexp.MustCompile(`^create (?:unique )?index (concurrently )?(?:if not exists )?(?:([\w."$]+) )?on (?:only )?([\w."$]+)`)
	lintDropIndexCC = regexp.MustCompile(`^drop index concurrently (?:if exists )?([\w."$]+)`)
	lintSet         = regexp.MustCompile(`^set (local |session )?([\w.]+)`)
	// Statements that take an ACCESS EXCLUSIVE lock on the table they name.
	lintExclusive = []*regexp.Regexp{
		regexp.MustCompile(`^alter table (?:if exists )?(?:only )?([\w."$]+)`),
		regexp.MustCompile(`^drop table (?:if exists )?([\w."$]+)`),
		regexp.MustCompile(`^truncate (?:table )?(?:only )?([\w."$]+)`),
		regexp.MustCompile(`^vacuum \(?full\b.*?([\w."$]+)$`),
		regexp.MustCompile(`^cluster (?:verbose )?([\w."$]+)`),
		regexp.MustCompile(`^refresh materialized view ([\w."$]+)`),
		regexp.MustCompile(`^drop index (?:if exists )?([\w."$]+)`),
		regexp.MustCompile(`^reindex (?:table |index )([\w."$]+)`),
	}
	lintLock = regexp.MustCompile(`^lock (?:table )?(?:only )?([\w."$]+)(?:.* in ([a-z ]+) mode)?`)
)

// lintName returns the unquoted, unqualified, lower-cased name.
func lintName(s string) string {
	s = strings.ReplaceAll(s, `"`, "")
	if i := strings.LastIndex(s, "."); i >= 0 {
		s = s[i+1:]
	}
	return strings.ToLower(s)
}

// Lint reports risky patterns in the lanes' files, without a database: in a blocking lane,
// `create index` without `concurrently` on a table the lanes did not create before it, and a
// statement taking an ACCESS EXCLUSIVE lock on such a table (alter, drop, truncate, lock,
// vacuum full, cluster, refresh materialized view, drop index, reindex) while no lock_timeout
// is set (in the file before it, or in the connection's runtime parameters); in any lane, a
// disable-tx `create index concurrently` without `drop index concurrently if exists` before it
// (an interrupted build leaves an INVALID index that `if not exists` would keep), `create index
// concurrently` in a transactional file, and `SET` statements (reset after every migration).
// Go migrations are not inspected. The warnings are in lane and file order.
func (m *Migrator) Lint() []LintWarning {
	connTimeout := m.connConfig.RuntimeParams["lock_timeout"] != "" ||
		strings.Contains(m.connConfig.RuntimeParams["options"], "lock_timeout")
	created := map[string]bool{} // tables created by earlier statements of the lanes
	var out []LintWarning
	for _, l := range m.lanes {
		blocking := l.Mode == Blocking
		for _, mig := range l.migrations {
			if mig.SQL == "" {
				continue
			}
			fileTimeout := false
			dropped := map[string]bool{} // indexes dropped concurrently earlier in this file
			for _, st := range mig.statements {
				text := firstToken(st.SQL)
				line := st.Line + strings.Count(st.SQL[:len(st.SQL)-len(text)], "\n")
				s := strings.TrimSpace(lintSpace.ReplaceAllString(strings.ToLower(MaskLiterals(text)), " "))
				s = strings.TrimSuffix(s, ";")
				warn := func(rule, format string, args ...any) {
					out = append(out, LintWarning{Lane: l.Name, File: mig.Name, Line: line, Rule: rule, Message: fmt.Sprintf(format, args...)})
				}
				if g := lintCreateTable.FindStringSubmatch(s); g != nil {
					created[lintName(g[1])] = true
					continue
				}
				if g := lintSet.FindStringSubmatch(s); g != nil {
					local := strings.TrimSpace(g[1]) == "local"
					if strings.ToLower(g[2]) == "lock_timeout" && (!local || !mig.DisableTx) {
						fileTimeout = true
					}
					switch {
					case local && mig.DisableTx:
						warn(LintSet, "SET LOCAL %s has no effect outside a transaction (this file is disable-tx)", g[2])
					case !local:
						warn(LintSet, "SET %s lasts only until this migration ends (the migrator runs reset all after each one): use SET LOCAL for this file, or the connection's runtime parameters for every migration", g[2])
					}
					continue
				}
				if g := lintDropIndexCC.FindStringSubmatch(s); g != nil {
					dropped[lintName(g[1])] = true
					continue
				}
				if g := lintCreateIndex.FindStringSubmatch(s); g != nil {
					concurrent, index, table := g[1] != "", lintName(g[2]), lintName(g[3])
					switch {
					case !concurrent && blocking && !created[table]:
						warn(LintIndexNotConcurrent, "create index on existing table %s without concurrently in blocking lane %q: writes to %s wait for the whole build; build it with create index concurrently in a disable-tx file of a background lane", table, l.Name, table)
					case concurrent && !mig.DisableTx:
						warn(LintIndexInTransaction, "create index concurrently cannot run inside a transaction block: add ---- tern: disable-tx ---- to the file")
					case concurrent && (index == "" || !dropped[index]):
						name := index
						if name == "" {
							name = "the index (name it)"
						}
						warn(LintIndexNotRerunnable, "create index concurrently is not re-runnable: an interrupted build leaves an INVALID index; put drop index concurrently if exists %s before it", name)
					}
					continue
				}
				if !blocking || fileTimeout || connTimeout {
					continue
				}
				table := ""
				if g := lintLock.FindStringSubmatch(s); g != nil && (g[2] == "" || g[2] == "access exclusive") {
					table = g[1]
				}
				for _, re := range lintExclusive {
					if g := re.FindStringSubmatch(s); g != nil && table == "" {
						table = g[1]
					}
				}
				if table != "" && !created[lintName(table)] {
					warn(LintNoLockTimeout, "takes an ACCESS EXCLUSIVE lock on %s in blocking lane %q without lock_timeout: queued behind a long query it blocks every query on %s; set lock_timeout (SET LOCAL lock_timeout = '5s' first, or in the connection's options)", lintName(table), l.Name, lintName(table))
				}
			}
		}
	}
	return out
}
