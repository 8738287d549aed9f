package bench

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestRoots(t *testing.T) {
	infos := []PathInfo{{Path: "/a"}, {Path: "/b", Refs: []string{"/a", "/b"}}, {Path: "/c", Refs: []string{"/a"}}}
	if got := strings.Join(Roots(infos), ","); got != "/b,/c" {
		t.Fatalf("Roots = %s, want /b,/c", got)
	}
}

func TestCacheServerCounts(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "nar"), 0o755)
	os.WriteFile(filepath.Join(dir, "nar", "x.nar.zst"), []byte("12345"), 0o644)
	os.WriteFile(filepath.Join(dir, "h.narinfo"), []byte("n"), 0o644)
	s, err := ServeCache(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, p := range []string{"/nar/x.nar.zst", "/nar/x.nar.zst", "/h.narinfo", "/missing.narinfo"} {
		resp, err := http.Get(s.URL + p)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	st := s.Stats()
	if st.NarGets != 2 || st.NarFiles != 1 || st.MaxNarGets != 2 || st.NarBytes != 10 || st.NarinfoGets != 2 {
		t.Fatalf("stats %+v", st)
	}
	s.Reset()
	if st := s.Stats(); st.NarGets != 0 || st.NarFiles != 0 {
		t.Fatalf("after Reset: %+v", st)
	}
}

func TestRewriteSubstSection(t *testing.T) {
	p := filepath.Join(t.TempDir(), "b.md")
	os.WriteFile(p, []byte("x\n"+SubstSectionBegin+"\nold\n"+SubstSectionEnd+"\ny\n"), 0o644)
	if err := RewriteSubstSection(p, "new"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	if want := "x\n" + SubstSectionBegin + "\nnew\n" + SubstSectionEnd + "\ny\n"; string(b) != want {
		t.Fatalf("got %q", b)
	}
}

func TestCPUGroupCountsForkedProcesses(t *testing.T) {
	g, err := NewCPUGroup(fmt.Sprintf("nixyard-bench-test-%d", os.Getpid()))
	if err != nil {
		t.Skipf("no cpuacct group here: %v", err)
	}
	defer func() {
		if err := g.Close(); err != nil {
			t.Error(err)
		}
	}()
	// The shell waits for a line, so it is in the group before the loop
	// (run in a child it forks) uses any CPU.
	cmd := exec.Command("sh", "-c", `read x; sh -c 'i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done'`)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if err := g.Add(cmd.Process.Pid); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal(err)
	}
	before, err := g.Usage()
	if err != nil {
		t.Fatal(err)
	}
	stdin.Write([]byte("go\n"))
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	after, err := g.Usage()
	if err != nil {
		t.Fatal(err)
	}
	if after <= before {
		t.Errorf("usage %v -> %v: the forked loop's CPU time was not counted", before, after)
	}
}
