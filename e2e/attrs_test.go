package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
)

// What a derivation's attributes ask of a build besides running its
// builder: output placeholders, passAsFile, exportReferencesGraph,
// structured attributes and the output checks. Where the builder writes
// what it was given into its output, the test also builds the same
// derivation with real Nix in a chroot store of its own: both must give
// the same NAR hashes.

// buildLikeNix builds attr through the daemon and with real Nix directly
// in a store of its own (named after the attribute), checks that the
// closures agree, and returns the daemon's output paths.
func (b *buildEnv) buildLikeNix(t *testing.T, args []string, attr string) []string {
	t.Helper()
	got := sortedLines(b.nixBuild(append(args, "-A", attr, "--no-out-link")...).ok(t))
	other := b.otherStore("reference-" + attr)
	want := sortedLines(b.cmd("nix-build", append(args, "-A", attr, "--no-out-link", "--store", other)...).ok(t))
	if !equalSorted(got, want) {
		t.Fatalf("%s: daemon built %q, real Nix %q", attr, got, want)
	}
	gotInfo := parsePathInfos(t, "daemon", b.nix(t, append([]string{"path-info", "--json", "-r"}, got...)...))
	wantInfo := parsePathInfos(t, "reference", b.local(other, "nix", append([]string{"path-info", "--json", "-r"}, want...)...).ok(t))
	assertSameClosure(t, attr, wantInfo, gotInfo)
	return got
}

// readOutput reads a file of a built output through the store's root.
func (b *buildEnv) readOutput(t *testing.T, storePath string) string {
	t.Helper()
	data, err := os.ReadFile(b.realPath(storePath))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// TestBuildPlaceholders: `placeholder "out"` in a builder's arguments,
// environment and passAsFile files is its output's path.
func TestBuildPlaceholders(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "placeholders", `{
  ph = mk {
    name = "ph";
    outputs = [ "out" "dev" ];
    devPath = placeholder "dev";
    inFile = "file: ${placeholder "out"}";
    passAsFile = [ "inFile" ];
    script = ''echo ${placeholder "out"} > ${placeholder "out"}; echo $devPath > $dev; cat $inFilePath >> $out'';
  };
}`)
	out := b.buildLikeNix(t, args, "ph")[0]
	dev := b.buildLikeNix(t, args, "ph.dev")[0]
	if got, want := b.readOutput(t, out), out+"\nfile: "+out; got != want {
		t.Errorf("out holds %q, want %q", got, want)
	}
	if got := b.readOutput(t, dev); got != dev+"\n" {
		t.Errorf("dev holds %q, want %q", got, dev+"\n")
	}
}

// TestBuildOutputChecks: allowedReferences, allowedRequisites,
// disallowedReferences and disallowedRequisites fail a build whose output
// breaks them, with Nix's message, and nothing is registered.
func TestBuildOutputChecks(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "outputchecks", `rec {
  dep = mk { name = "oc-dep"; script = "echo dep > $out"; };
  dep2 = mk { name = "oc-dep2"; inherit dep; script = "echo $dep > $out"; };
  allowedOK = mk { name = "oc-allowed-ok"; inherit dep; allowedReferences = [ dep ]; script = "echo $dep > $out"; };
  allowedBad = mk { name = "oc-allowed-bad"; inherit dep; allowedReferences = [ ]; script = "echo $dep > $out"; };
  selfOK = mk { name = "oc-self-ok"; allowedReferences = [ "out" ]; script = "echo $out > $out"; };
  selfBad = mk { name = "oc-self-bad"; allowedReferences = [ ]; script = "echo $out > $out"; };
  disallowedBad = mk { name = "oc-disallowed-bad"; inherit dep; disallowedReferences = [ dep ]; script = "echo $dep > $out"; };
  requisitesOK = mk { name = "oc-reqs-ok"; inherit dep2; allowedRequisites = [ dep2 dep ]; script = "echo $dep2 $out > $out"; };
  requisitesBad = mk { name = "oc-reqs-bad"; inherit dep2; allowedRequisites = [ dep2 ]; script = "echo $dep2 > $out"; };
  disallowedReqsBad = mk { name = "oc-disreqs-bad"; inherit dep2; disallowedRequisites = [ dep ]; script = "echo $dep2 > $out"; };
  illegal = mk { name = "oc-illegal"; allowedReferences = [ "nonsense" ]; script = "echo > $out"; };
  structuredBad = mk {
    name = "oc-structured-bad";
    __structuredAttrs = true;
    inherit dep;
    outputChecks.out.disallowedReferences = [ dep ];
    script = "echo ${dep} > ${placeholder "out"}";
  };
  # The checked output sorts after one without checks.
  structuredMulti = mk {
    name = "oc-structured-multi";
    __structuredAttrs = true;
    outputs = [ "out" "dev" ];
    inherit dep;
    outputChecks.out.disallowedRequisites = [ dep ];
    script = "echo ${dep} > ${placeholder "out"}; echo > ${placeholder "dev"}";
  };
  tooLarge = mk {
    name = "oc-too-large";
    __structuredAttrs = true;
    outputChecks.out.maxSize = 100;
    script = "echo 0123456789 > ${placeholder "out"}";
  };
  closureTooLarge = mk {
    name = "oc-closure-too-large";
    __structuredAttrs = true;
    inherit dep;
    outputChecks.out.maxSize = 1000;
    outputChecks.out.maxClosureSize = 200;
    script = "echo ${dep} > ${placeholder "out"}";
  };
}`)
	path := func(attr string) string {
		return strings.TrimSpace(b.nixBuild(append(args, "-A", attr, "--no-out-link")...).ok(t))
	}
	dep := path("dep")
	for _, attr := range []string{"allowedOK", "selfOK", "requisitesOK"} {
		path(attr)
	}
	const store = `/nix/store/[a-z0-9]{32}-`
	for _, c := range []struct{ attr, want string }{
		{"allowedBad", "output '" + store + "oc-allowed-bad' is not allowed to refer to the following paths:\n\\s*" + regexp.QuoteMeta(dep)},
		{"selfBad", "output '(" + store + "oc-self-bad)' is not allowed to refer to the following paths:\n\\s*" + store + "oc-self-bad\n"},
		{"disallowedBad", "output '" + store + "oc-disallowed-bad' is not allowed to refer to the following paths:\n\\s*" + regexp.QuoteMeta(dep)},
		{"requisitesBad", "output '" + store + "oc-reqs-bad' is not allowed to refer to the following paths:\n\\s*" + regexp.QuoteMeta(dep) + "\n"},
		{"disallowedReqsBad", "output '" + store + "oc-disreqs-bad' is not allowed to refer to the following paths:\n\\s*" + regexp.QuoteMeta(dep) + "\n"},
		{"illegal", "derivation contains an illegal reference specifier 'nonsense'"},
		{"structuredBad", "output '" + store + "oc-structured-bad' is not allowed to refer to the following paths:\n\\s*" + regexp.QuoteMeta(dep)},
		{"structuredMulti", "output '" + store + "oc-structured-multi' is not allowed to refer to the following paths:\n\\s*" + regexp.QuoteMeta(dep)},
		{"tooLarge", "path '" + store + "oc-too-large' is too large at [0-9]+ bytes; limit is 100 bytes"},
		{"closureTooLarge", "closure of path '" + store + "oc-closure-too-large' is too large at [0-9]+ bytes; limit is 200 bytes"},
	} {
		stderr := b.nixBuild(append(args, "-A", c.attr, "--no-out-link")...).fails(t)
		if !regexp.MustCompile(c.want).MatchString(stderr) {
			t.Errorf("%s: stderr does not match %q:\n%s", c.attr, c.want, stderr)
		}
		// The output was not registered.
		drv := strings.TrimSpace(b.client("nix-instantiate", append(args, "-A", c.attr)...).ok(t))
		for _, out := range lines(b.client("nix-store", "-q", "--outputs", drv).ok(t)) {
			if b.isValid(t, out) {
				t.Errorf("%s: output %s is valid after a failed check", c.attr, out)
			}
		}
	}
}

// TestBuildExportReferencesGraph: exportReferencesGraph gives the builder
// the closure of a path (and of a derivation's outputs) in the format of
// `nix-store --register-validity`, as real Nix does.
func TestBuildExportReferencesGraph(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "refgraph", `rec {
  dep = mk { name = "rg-dep"; script = "echo dep > $out"; };
  dep2 = mk { name = "rg-dep2"; inherit dep; script = "echo $dep > $out"; };
  graph = mk { name = "rg-graph"; exportReferencesGraph = [ "closure" dep2 "again" dep ]; script = "cat closure again > $out"; };
  drvGraph = mk { name = "rg-drv-graph"; exportReferencesGraph = [ "closure" dep2.drvPath ]; script = "cp closure $out"; };
  odd = mk { name = "rg-odd"; exportReferencesGraph = [ "closure" ]; script = "echo > $out"; };
  badName = mk { name = "rg-bad-name"; exportReferencesGraph = [ "../x" dep ]; script = "echo > $out"; };
  outside = mk { name = "rg-outside"; exportReferencesGraph = [ "x" "/nix/store/00000000000000000000000000000000-outside" ]; script = "echo > $out"; };
}`)
	dep := strings.TrimSpace(b.nixBuild(append(args, "-A", "dep", "--no-out-link")...).ok(t))
	dep2 := strings.TrimSpace(b.nixBuild(append(args, "-A", "dep2", "--no-out-link")...).ok(t))
	out := b.buildLikeNix(t, args, "graph")[0]
	entries := map[string]string{dep: dep + "\n\n0\n", dep2: dep2 + "\n\n1\n" + dep + "\n"}
	paths := []string{dep, dep2}
	sort.Strings(paths)
	want := entries[paths[0]] + entries[paths[1]] + entries[dep]
	if got := b.readOutput(t, out); got != want {
		t.Errorf("graph holds\n%s\nwant\n%s", got, want)
	}
	b.buildLikeNix(t, args, "drvGraph")
	for _, c := range []struct{ attr, want string }{
		{"odd", "odd number of tokens in 'exportReferencesGraph': 'closure'"},
		{"badName", "invalid file name '../x' in 'exportReferencesGraph'"},
		{"outside", "cannot export references of path '/nix/store/00000000000000000000000000000000-outside' because it is not in the input closure of the derivation"},
	} {
		stderr := b.nixBuild(append(args, "-A", c.attr, "--no-out-link")...).fails(t)
		if !strings.Contains(stderr, c.want) {
			t.Errorf("%s: stderr lacks %q:\n%s", c.attr, c.want, stderr)
		}
	}
}

// TestBuildStructuredAttrs: a derivation with __structuredAttrs gets its
// attributes in .attrs.json and .attrs.sh, byte for byte as real Nix
// writes them, with its outputs and exportReferencesGraph's closures.
func TestBuildStructuredAttrs(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "structured", `rec {
  dep = mk { name = "sa-dep"; script = "echo dep > $out"; };
  dep2 = mk { name = "sa-dep2"; inherit dep; script = "echo $dep > $out"; };
  attrs = mk {
    name = "sa-attrs";
    __structuredAttrs = true;
    outputs = [ "out" "doc" ];
    inherit dep2;
    str = "it's \"quoted\"\n\ttabbed \u00e9 $HOME";
    int = 42;
    negative = -7;
    float = 1.5;
    integralFloat = 2.0;
    bigFloat = 1.0e20;
    yes = true;
    no = false;
    nothing = null;
    list = [ "a" 1 true null ];
    mixed = [ "a" [ "nested" ] ];
    set = { x = "y"; n = 3; b = false; };
    deep = { x = { y = 1; }; };
    "not-a-name" = "skipped in .attrs.sh";
    self = placeholder "out";
    exportReferencesGraph.closure = [ dep2 ];
    script = ''mkdir ${placeholder "out"}; cp $NIX_BUILD_TOP/.attrs.json $NIX_BUILD_TOP/.attrs.sh ${placeholder "out"}/; echo > ${placeholder "doc"}; env | grep -c '^str=' >> ${placeholder "out"}/env || true'';
  };
}`)
	dep := strings.TrimSpace(b.nixBuild(append(args, "-A", "dep", "--no-out-link")...).ok(t))
	dep2 := strings.TrimSpace(b.nixBuild(append(args, "-A", "dep2", "--no-out-link")...).ok(t))
	out := b.buildLikeNix(t, args, "attrs")[0]
	doc := strings.TrimSpace(b.nixBuild(append(args, "-A", "attrs.doc", "--no-out-link")...).ok(t))
	var attrs map[string]any
	if err := json.Unmarshal([]byte(b.readOutput(t, out+"/.attrs.json")), &attrs); err != nil {
		t.Fatal(err)
	}
	outputs, _ := attrs["outputs"].(map[string]any)
	if outputs["out"] != out || attrs["self"] != out {
		t.Errorf("outputs %v, self %v: want %s", outputs, attrs["self"], out)
	}
	closure, _ := attrs["closure"].([]any)
	if len(closure) != 2 {
		t.Fatalf("closure: %v", attrs["closure"])
	}
	for _, e := range closure {
		info, _ := e.(map[string]any)
		if p := info["path"]; p != dep && p != dep2 {
			t.Errorf("closure entry for %v", p)
		}
		if h, _ := info["narHash"].(string); !regexp.MustCompile(`^sha256:[0-9a-z]{52}$`).MatchString(h) {
			t.Errorf("closure entry narHash %q", h)
		}
	}
	sh := b.readOutput(t, out+"/.attrs.sh")
	for _, line := range []string{
		fmt.Sprintf("declare -A outputs=(['doc']='%s' ['out']='%s' )", doc, out),
		"declare int=42",
		"declare integralFloat=2",
		"declare -a list=('a' 1 1 '' )",
		"declare no=",
		"declare yes=1",
		"declare str='it'\\''s \"quoted\"",
	} {
		if !strings.Contains(sh, line) {
			t.Errorf(".attrs.sh lacks %q:\n%s", line, sh)
		}
	}
	// Non-integral numbers, nested values and names that are not shell
	// variables are left out.
	for _, absent := range []string{" float=", " mixed=", " deep=", "not-a-name", " closure="} {
		if strings.Contains(sh, absent) {
			t.Errorf(".attrs.sh has %q:\n%s", absent, sh)
		}
	}
	if env := b.readOutput(t, out+"/env"); strings.TrimSpace(env) != "0" {
		t.Errorf("the attributes reached the environment: %q", env)
	}
}
