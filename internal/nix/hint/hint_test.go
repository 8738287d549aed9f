package hint

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"
)

func TestFmt(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{Fmt("builder for '%s' failed with exit code %d", "/nix/store/x.drv", 3),
			"builder for '\x1b[35;1m/nix/store/x.drv\x1b[0m' failed with exit code \x1b[35;1m3\x1b[0m"},
		{Fmt("%q and %5d", "a", 7), "\x1b[35;1m\"a\"\x1b[0m and \x1b[35;1m    7\x1b[0m"},
		{Y(2) + " dependencies", "\x1b[35;1m2\x1b[0m dependencies"},
		{B("nix log /nix/store/x.drv"), "\x1b[1mnix log /nix/store/x.drv\x1b[0m"},
		{Strip(Fmt("path '%s' is %s", "/nix/store/y", B("gone"))), "path '/nix/store/y' is gone"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func TestStripAttr(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{ReplaceAttr: StripAttr}))
	log.Info(Fmt("built %s", "x"), "path", Y("/nix/store/y"), "err", errors.New(Fmt("no %s", "z")), "n", 3)
	if strings.Contains(buf.String(), "\x1b") || strings.Contains(buf.String(), `\x1b`) {
		t.Errorf("escape codes in the log: %s", buf.String())
	}
	for _, want := range []string{"path=/nix/store/y", `err="no z"`, "n=3"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("log %q lacks %q", buf.String(), want)
		}
	}
}
