package daemon

import "testing"

// TestNixErrorText: a logged error is laid out as Nix's showErrorInfo lays
// it out, so that the client prints it as it prints nix-daemon's.
func TestNixErrorText(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"one line", ansiRed + "error:" + ansiNormal + " one line"},
		{"builder for 'x' failed with exit code 3;\nlast 2 log lines:\n> a  \n> b\nFor full logs, run 'nix log x'.\n",
			ansiRed + "error:" + ansiNormal + " builder for 'x' failed with exit code 3;\n       last 2 log lines:\n       > a\n       > b\n       For full logs, run 'nix log x'."},
		{"a\n\nb", ansiRed + "error:" + ansiNormal + " a\n\n       b"},
	} {
		if got := nixErrorText(c.in); got != c.want {
			t.Errorf("nixErrorText(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}
