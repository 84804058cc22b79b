package migrator

import "strings"

// statement is one SQL statement of a migration file with the line of the file it starts on.
type statement struct {
	SQL    string
	Line   int // 1-based line of the rendered up SQL where the statement starts
	Offset int // byte offset in the rendered up SQL where SQL starts
}

// splitStatements splits SQL into statements at top-level semicolons, as the server's parser
// does, so that the n-th statement here is the n-th the server runs (a failing statement is
// located by counting the statements the server completed). It understands single-quoted
// strings (with ” escapes and E” backslash escapes), double-quoted identifiers, dollar-quoted
// strings ($$ and $tag$), line comments and nested block comments, parentheses (a multi-action
// rule's actions) and the BEGIN ATOMIC ... END body of a CREATE [OR REPLACE] FUNCTION or
// PROCEDURE (with CASE ... END inside it), so semicolons inside any of those do not split.
// Statements holding only whitespace and comments are dropped.
func splitStatements(sql string) []statement {
	var out []statement
	start, line, startLine := 0, 1, 1
	var (
		parens  int      // depth of open parentheses
		words   []string // the first words of the statement, lower-cased (up to 4)
		routine bool     // the statement is CREATE [OR REPLACE] FUNCTION or PROCEDURE
		blocks  int      // depth of BEGIN (and CASE inside it) ... END in a routine's body
	)
	word := func(w string) {
		w = strings.ToLower(w)
		if len(words) < 4 {
			words = append(words, w)
			routine = isRoutineStart(words)
		}
		if !routine || parens > 0 {
			return
		}
		switch {
		case w == "begin":
			blocks++
		case w == "case" && blocks > 0:
			blocks++
		case w == "end" && blocks > 0:
			blocks--
		}
	}
	emit := func(end int) {
		text := sql[start:end]
		if !onlyComments(text) {
			trimmed := strings.TrimSpace(text)
			// Report the line where the statement as sent (trimmed) starts, so that an error
			// position within it maps onto the file.
			lead := text[:len(text)-len(strings.TrimLeft(text, " \t\r\n\f"))]
			out = append(out, statement{SQL: trimmed, Line: startLine + strings.Count(lead, "\n"), Offset: start + len(lead)})
		}
	}
	for i := 0; i < len(sql); {
		c := sql[i]
		switch {
		case c == '\n':
			line++
			i++
		case c == '-' && i+1 < len(sql) && sql[i+1] == '-':
			for i < len(sql) && sql[i] != '\n' {
				i++
			}
		case c == '/' && i+1 < len(sql) && sql[i+1] == '*':
			end := skipBlockComment(sql, i)
			line += strings.Count(sql[i:end], "\n")
			i = end
		case c == '\'' || c == '"':
			// E'...' strings take backslash escapes; identifiers and standard strings do not.
			escapes := c == '\'' && i > 0 && (sql[i-1] == 'e' || sql[i-1] == 'E') && (i < 2 || !isIdentChar(sql[i-2]))
			end := skipQuoted(sql, i, escapes)
			line += strings.Count(sql[i:end], "\n")
			i = end
		case c == '$' && (i == 0 || !isIdentChar(sql[i-1])):
			tag, ok := dollarTag(sql[i:])
			if !ok {
				i++
				continue
			}
			end := strings.Index(sql[i+len(tag):], tag)
			if end < 0 {
				end = len(sql) - i - len(tag) // unterminated: the rest is the string
			} else {
				end += len(tag)
			}
			body := sql[i : i+len(tag)+end]
			line += strings.Count(body, "\n")
			i += len(body)
		case c == '(':
			parens++
			i++
		case c == ')':
			if parens > 0 {
				parens--
			}
			i++
		case c == ';' && (parens > 0 || blocks > 0):
			i++
		case c == ';':
			emit(i + 1)
			i++
			start, startLine = i, line
			words, routine, blocks = words[:0], false, 0
		case isIdentChar(c):
			j := i
			for j < len(sql) && (isIdentChar(sql[j]) || sql[j] == '$') {
				j++
			}
			if c < '0' || c > '9' {
				word(sql[i:j])
			}
			i = j
		default:
			i++
		}
	}
	if start < len(sql) {
		emit(len(sql))
	}
	return out
}

// isRoutineStart reports whether the first words of a statement begin CREATE [OR REPLACE]
// FUNCTION or PROCEDURE, whose body may be BEGIN ATOMIC ... END holding semicolons.
func isRoutineStart(w []string) bool {
	if len(w) < 2 || w[0] != "create" {
		return false
	}
	if w[1] == "function" || w[1] == "procedure" {
		return true
	}
	return len(w) >= 4 && w[1] == "or" && w[2] == "replace" && (w[3] == "function" || w[3] == "procedure")
}

// dollarTag returns the opening dollar-quote tag at the start of s ("$$" or "$name$").
func dollarTag(s string) (string, bool) {
	for j := 1; j < len(s); j++ {
		c := s[j]
		if c == '$' {
			return s[:j+1], true
		}
		if !(c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= 0x80 || (j > 1 && c >= '0' && c <= '9')) {
			return "", false
		}
	}
	return "", false
}

func isIdentChar(c byte) bool {
	return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c >= 0x80
}

// onlyComments reports whether text holds nothing but whitespace, comments and semicolons.
func onlyComments(text string) bool {
	return firstToken(text) == ""
}

// firstToken returns text from its first character that is not whitespace, a semicolon or part
// of a comment, or "" when there is none.
func firstToken(text string) string {
	i := 0
	for i < len(text) {
		switch c := text[i]; {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == ';':
			i++
		case c == '-' && i+1 < len(text) && text[i+1] == '-':
			for i < len(text) && text[i] != '\n' {
				i++
			}
		case c == '/' && i+1 < len(text) && text[i+1] == '*':
			i = skipBlockComment(text, i)
		default:
			return text[i:]
		}
	}
	return ""
}

// skipBlockComment returns the index just past the block comment that starts at s[i] ("/*"),
// counting nested comments as PostgreSQL does; an unterminated comment runs to the end.
func skipBlockComment(s string, i int) int {
	depth := 0
	for i < len(s) {
		switch {
		case s[i] == '/' && i+1 < len(s) && s[i+1] == '*':
			depth++
			i += 2
		case s[i] == '*' && i+1 < len(s) && s[i+1] == '/':
			depth--
			i += 2
			if depth == 0 {
				return i
			}
		default:
			i++
		}
	}
	return i
}

// skipQuoted returns the index just past the quoted string or identifier that starts at s[i]
// (its quote character doubled inside it stands for itself; with escapes, a backslash escapes
// the next byte); an unterminated one runs to the end.
func skipQuoted(s string, i int, escapes bool) int {
	quote := s[i]
	for i++; i < len(s); i++ {
		switch {
		case escapes && s[i] == '\\':
			i++
		case s[i] == quote && i+1 < len(s) && s[i+1] == quote:
			i++
		case s[i] == quote:
			return i + 1
		}
	}
	return len(s)
}

// MaskLiterals returns s, an error message or SQL text, with the contents of its string
// literals replaced by "***": single-quoted strings (with ” and, after E, backslash escapes)
// and dollar-quoted strings ($$...$$, $tag$...$tag$). An unterminated literal (as in a statement
// cut short) is masked to the end. Double quotes are not skipped, since server messages quote
// tokens in them (syntax error at or near "'secret'"). It errs on the side of masking: an
// apostrophe in prose starts a literal too. Use it for text shown to
// anyone who can reach an unauthenticated endpoint: a failing `alter role ... password '...'`
// must not show its password there.
func MaskLiterals(s string) string {
	var b strings.Builder
	last := 0
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '\'':
			escapes := i > 0 && (s[i-1] == 'e' || s[i-1] == 'E') && (i < 2 || !isIdentChar(s[i-2]))
			end := skipQuoted(s, i, escapes)
			b.WriteString(s[last:i])
			b.WriteString("'***")
			if end > i+1 && s[end-1] == '\'' && end-1 > i {
				b.WriteByte('\'')
			}
			last, i = end, end
		case c == '$' && (i == 0 || !isIdentChar(s[i-1])):
			tag, ok := dollarTag(s[i:])
			if !ok {
				i++
				continue
			}
			rest := strings.Index(s[i+len(tag):], tag)
			b.WriteString(s[last:i])
			b.WriteString(tag + "***")
			if rest < 0 {
				last, i = len(s), len(s)
				continue
			}
			b.WriteString(tag)
			last = i + len(tag) + rest + len(tag)
			i = last
		default:
			i++
		}
	}
	b.WriteString(s[last:])
	return b.String()
}
