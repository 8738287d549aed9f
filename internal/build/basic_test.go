package build

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/hint"
)

// TestBuildBasic builds derivations sent whole, as BuildDerivation does:
// an input-addressed one whose input derivation is resolved to its output
// (path taken as given), and fixed-output ones, whose paths are checked.
func TestBuildBasic(t *testing.T) {
	e := newChrootEnv(t)
	drvs := e.instantiate(`rec {
  dep = mk { name = "dep"; script = "echo dep > $out"; };
  top = mk { name = "top"; inherit dep; script = "echo top $dep > $out"; };
  fixed = mk { name = "fixed"; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = "sha256-Mhxd/jqpSIrg+t3oddwxrvoJXq/yfWfDzOe8UW8g7Xs="; script = "mkdir $out; echo r > $out/f"; };
  lone = mk { name = "lone"; script = "echo > $out"; };
}`, "dep", "top", "fixed", "lone")
	b := e.builder(Config{Sandbox: SandboxOn})
	depOut := e.mustBuild(b, out(drvs["dep"]))[0].BuiltOutputs["out"]

	basic := func(name string) *derivation.Derivation {
		d, err := derivation.ParseFile(e.st.RealPath(drvs[name]))
		if err != nil {
			t.Fatal(err)
		}
		for range d.InputDrvs {
			d.InputSrcs = append(d.InputSrcs, e.st.Dir().Abs(depOut))
		}
		d.InputDrvs = nil
		return d
	}

	// With max-jobs 0 the request fails as a whole, as with Nix.
	if _, err := b.BuildBasic(t.Context(), drvs["top"], basic("top"), ClientOptions{NoLocalBuilds: true}, nil); !errors.Is(err, ErrNoLocalBuilds) {
		t.Errorf("max-jobs 0: err = %v, want ErrNoLocalBuilds", err)
	}

	rec := &recorder{}
	res, err := b.BuildBasic(t.Context(), drvs["top"], basic("top"), ClientOptions{}, rec)
	if err != nil {
		t.Fatal(err)
	}
	if res.Status != Built || res.TimesBuilt != 1 {
		t.Fatalf("top: status %d (%s), times built %d", res.Status, res.ErrorMsg, res.TimesBuilt)
	}
	top := res.BuiltOutputs["out"]
	if got := e.readOut(top, ""); got != "top "+e.st.Dir().Abs(depOut)+"\n" {
		t.Errorf("top output: %q", got)
	}
	if info, err := e.st.QueryPathInfo(t.Context(), top); err != nil || len(info.References) != 1 || info.References[0] != depOut {
		t.Errorf("top references: %+v, %v", info, err)
	}
	if len(rec.started) != 1 || rec.started[0] != e.st.Dir().Abs(drvs["top"]) {
		t.Errorf("progress: started %q", rec.started)
	}
	// Again: already valid, nothing runs.
	res, err = b.BuildBasic(t.Context(), drvs["top"], basic("top"), ClientOptions{}, nil)
	if err != nil || res.Status != AlreadyValid || res.BuiltOutputs["out"] != top {
		t.Fatalf("second build: %+v, %v", res, err)
	}

	// A fixed output is built; one sent with a path that does not match
	// its hash is refused.
	res, err = b.BuildBasic(t.Context(), drvs["fixed"], basic("fixed"), ClientOptions{}, nil)
	if err != nil || res.Status != Built {
		t.Fatalf("fixed: %+v, %v", res, err)
	}
	bad := basic("fixed")
	o := bad.Outputs["out"]
	o.Path = e.st.Dir().Abs(depOut)
	bad.Outputs["out"] = o
	res, err = b.BuildBasic(t.Context(), drvs["fixed"], bad, ClientOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Status.Success() || !strings.Contains(res.ErrorMsg, "fixed") {
		t.Fatalf("fixed output with a wrong path: status %d, %q", res.Status, res.ErrorMsg)
	}

	// An input source that is not there: Nix's status and words for a
	// derivation sent whole.
	lone := basic("lone")
	lone.InputSrcs = append(lone.InputSrcs, e.st.Dir().Abs(depOut)[:len(e.st.Dir())+1]+strings.Repeat("a", 32)+"-missing")
	res, err = b.BuildBasic(t.Context(), drvs["lone"], lone, ClientOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("some dependencies of '%s' are missing", e.st.Dir().Abs(drvs["lone"])); res.Status != MiscFailure || hint.Strip(res.ErrorMsg) != want {
		t.Errorf("a missing input source: status %d, %q; want %d, %q", res.Status, res.ErrorMsg, MiscFailure, want)
	}
}
