package restore_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"slices"
	"strings"
	"testing"
)

// exported lists the exported top-level names (not methods) of the package
// in dir, tests left out.
func exported(t *testing.T, dir string) []string {
	t.Helper()
	pkgs, err := parser.ParseDir(token.NewFileSet(), dir, func(fi fs.FileInfo) bool { return !strings.HasSuffix(fi.Name(), "_test.go") }, 0)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range pkgs {
		for _, f := range p.Files {
			for _, d := range f.Decls {
				switch d := d.(type) {
				case *ast.FuncDecl:
					if d.Recv == nil && d.Name.IsExported() {
						names = append(names, d.Name.Name)
					}
				case *ast.GenDecl:
					for _, s := range d.Specs {
						switch s := s.(type) {
						case *ast.TypeSpec:
							if s.Name.IsExported() {
								names = append(names, s.Name.Name)
							}
						case *ast.ValueSpec:
							for _, n := range s.Names {
								if n.IsExported() {
									names = append(names, n.Name)
								}
							}
						}
					}
				}
			}
		}
	}
	slices.Sort(names)
	return names
}

// TestFacadeNamesTheEngine: every exported name of restore/internal/engine
// has its name in restore, and restore exports nothing else, so the public
// API cannot silently lack what the engine grew.
func TestFacadeNamesTheEngine(t *testing.T) {
	eng, pub := exported(t, "internal/engine"), exported(t, ".")
	for _, n := range eng {
		if _, ok := slices.BinarySearch(pub, n); !ok {
			t.Errorf("engine.%s has no name in package restore (restore/restore.go)", n)
		}
	}
	for _, n := range pub {
		if _, ok := slices.BinarySearch(eng, n); !ok {
			t.Errorf("restore.%s is not the engine's", n)
		}
	}
}
