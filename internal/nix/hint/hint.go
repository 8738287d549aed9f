// Package hint formats error messages as Nix's hintfmt does: the values
// in a message are highlighted (bold magenta) with ANSI codes that the
// daemon sends to the client inside the message. The Nix client shows
// them on a terminal and strips them from any other output, so the same
// message reads plainly in a CI log.
package hint

import (
	"fmt"
	"io"
	"log/slog"
	"regexp"
	"strings"
)

// Nix's codes (ansicolor.hh): ANSI_WARNING highlights a value, ANSI_BOLD
// a command to run, ANSI_NORMAL ends either.
const (
	Warning = "\x1b[35;1m"
	Bold    = "\x1b[1m"
	Normal  = "\x1b[0m"
)

// Fmt is fmt.Sprintf with every argument highlighted, as Nix's hintfmt.
func Fmt(format string, args ...any) string {
	wrapped := make([]any, len(args))
	for i, a := range args {
		wrapped[i] = highlighted{a}
	}
	return fmt.Sprintf(format, wrapped...)
}

// Y is v, formatted as by %v, highlighted (Nix's yellowtxt).
func Y(v any) string { return fmt.Sprintf("%v", highlighted{v}) }

// B is s in bold.
func B(s string) string { return Bold + s + Normal }

// highlighted formats its value with the verb it is given, between
// Warning and Normal.
type highlighted struct{ v any }

func (h highlighted) Format(f fmt.State, verb rune) {
	io.WriteString(f, Warning)
	fmt.Fprintf(f, fmt.FormatString(f, verb), h.v)
	io.WriteString(f, Normal)
}

// escapes matches the CSI sequences this package and Nix's messages use.
var escapes = regexp.MustCompile("\x1b\\[[0-9;]*[a-zA-Z]")

// Strip removes ANSI escape sequences from s, for the daemon's own logs
// and for comparing messages in tests.
func Strip(s string) string { return escapes.ReplaceAllString(s, "") }

// StripAttr is a slog.HandlerOptions.ReplaceAttr that strips escape
// sequences from strings and errors, for a log that is not a terminal.
func StripAttr(_ []string, a slog.Attr) slog.Attr {
	switch a.Value.Kind() {
	case slog.KindString:
		if s := a.Value.String(); strings.Contains(s, "\x1b") {
			a.Value = slog.StringValue(Strip(s))
		}
	case slog.KindAny:
		if err, ok := a.Value.Any().(error); ok {
			if s := err.Error(); strings.Contains(s, "\x1b") {
				a.Value = slog.StringValue(Strip(s))
			}
		}
	}
	return a
}
