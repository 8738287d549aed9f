package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// buildsExpr defines the builds scenario's derivations with static
// busybox: clients.cI (I < nClients) is a list of perClient independent
// trivial derivations, chain is a chain of chainLen derivations, each
// referring to the previous one. Every builder records, through the
// sandbox-paths bind /marks, how many builders are running while it runs.
const buildsExpr = `{ bbdir, nClients, perClient, chainLen }:
let
  bb = builtins.path { path = bbdir; name = "busybox-static"; };
  mk = name: extra: builtins.derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "${bb}/busybox";
    args = [ "sh" "-c" "touch /marks/running/$name; ls /marks/running | wc -l >> /marks/samples; echo $name $prev > $out; rm /marks/running/$name" ];
    prev = "";
  } // extra);
  client = c: builtins.genList (i: mk "c${toString c}-${toString i}" {}) perClient;
in {
  clients = builtins.listToAttrs (builtins.genList (c: { name = "c${toString c}"; value = client c; }) nClients);
  chain = builtins.foldl' (prev: i: mk "chain-${toString i}" { inherit prev; }) (mk "chain-0" {}) (builtins.genList (i: i + 1) (chainLen - 1));
}
`

// BuildsFixture is the expression of the builds scenario and the marker
// directory its builders write to (bind it as /marks with sandbox-paths).
type BuildsFixture struct {
	Expr  string // the .nix file
	BBDir string // directory holding busybox
	Marks string
}

// WriteBuildsFixture writes the expression and a copy of busybox under dir.
func WriteBuildsFixture(dir, busybox string) (*BuildsFixture, error) {
	f := &BuildsFixture{Expr: filepath.Join(dir, "builds.nix"), BBDir: filepath.Join(dir, "bb"), Marks: filepath.Join(dir, "marks")}
	if err := os.MkdirAll(f.BBDir, 0o755); err != nil {
		return nil, err
	}
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return nil, fmt.Errorf("builds fixture: %w", err)
	}
	if err := os.WriteFile(filepath.Join(f.BBDir, "busybox"), bb, 0o755); err != nil {
		return nil, err
	}
	return f, os.WriteFile(f.Expr, []byte(buildsExpr), 0o644)
}

// Args are nix-build's arguments for attr with the given sizes.
func (f *BuildsFixture) Args(attr string, nClients, perClient, chainLen int) []string {
	return []string{f.Expr, "-A", attr, "--no-out-link",
		"--arg", "bbdir", f.BBDir,
		"--arg", "nClients", strconv.Itoa(nClients),
		"--arg", "perClient", strconv.Itoa(perClient),
		"--arg", "chainLen", strconv.Itoa(chainLen)}
}

// ResetMarks empties the marker directory (world-writable: builders may
// run under other uids).
func (f *BuildsFixture) ResetMarks() error {
	if err := os.RemoveAll(f.Marks); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(f.Marks, "running"), 0o777); err != nil {
		return err
	}
	for _, d := range []string{f.Marks, filepath.Join(f.Marks, "running")} {
		if err := os.Chmod(d, 0o777); err != nil {
			return err
		}
	}
	return nil
}

// Peak returns the number of builds that ran and the largest number of
// builders any of them saw running at once.
func (f *BuildsFixture) Peak() (builds, peak int, err error) {
	data, err := os.ReadFile(filepath.Join(f.Marks, "samples"))
	if err != nil {
		return 0, 0, fmt.Errorf("builds: reading samples: %w", err)
	}
	for _, l := range strings.Fields(string(data)) {
		n, err := strconv.Atoi(l)
		if err != nil {
			return 0, 0, fmt.Errorf("builds: sample %q: %w", l, err)
		}
		builds++
		peak = max(peak, n)
	}
	return builds, peak, nil
}
