package archtest

import (
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const module = "github.com/nixyard/nixyard/"

// forbidden maps a package prefix to the packages it must not import.
var forbidden = map[string][]string{
	"internal/nix/":       {"internal/nar", "internal/store", "internal/daemon", "internal/substitute", "internal/build", "internal/config"},
	"internal/nar":        {"internal/store", "internal/daemon", "internal/substitute", "internal/build"},
	"internal/store":      {"internal/daemon", "internal/config"},
	"internal/substitute": {"internal/daemon"},
	"internal/build":      {"internal/daemon"},
	"internal/tarball":    {"internal/store", "internal/daemon", "internal/build"},
}

type pkgInfo struct {
	docs    []string // files with a package doc comment
	imports map[string]bool
}

func loadPackages(t *testing.T) map[string]*pkgInfo {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	pkgs := map[string]*pkgInfo{}
	fset := token.NewFileSet()
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			name := d.Name()
			if path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "tmp") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.ParseComments|parser.ImportsOnly)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, filepath.Dir(path))
		p := pkgs[rel]
		if p == nil {
			p = &pkgInfo{imports: map[string]bool{}}
			pkgs[rel] = p
		}
		if f.Doc != nil {
			p.docs = append(p.docs, filepath.Base(path))
		}
		for _, imp := range f.Imports {
			p.imports[strings.Trim(imp.Path.Value, `"`)] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("repository root not found: %v", err)
	}
	return pkgs
}

func TestOneDocCommentPerPackage(t *testing.T) {
	for dir, p := range loadPackages(t) {
		if len(p.docs) != 1 {
			t.Errorf("package %s has %d doc comments (in %v), want exactly 1", dir, len(p.docs), p.docs)
		}
	}
}

func TestLayering(t *testing.T) {
	pkgs := loadPackages(t)
	if len(pkgs) < 5 {
		t.Fatalf("found only %d packages; is the walk broken?", len(pkgs))
	}
	for dir, p := range pkgs {
		for prefix, banned := range forbidden {
			if !strings.HasPrefix(dir+"/", prefix) && dir != strings.TrimSuffix(prefix, "/") {
				continue
			}
			for imp := range p.imports {
				for _, b := range banned {
					if imp == module+b || strings.HasPrefix(imp, module+b+"/") {
						t.Errorf("%s imports %s: lower layers must not import higher ones", dir, imp)
					}
				}
			}
		}
	}
}
