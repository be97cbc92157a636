package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestREADMEGoProgram compiles the Go program in README.md as written (it
// used to be a fragment that did not compile: "if err != nil { ... }",
// unused variables).
func TestREADMEGoProgram(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "\n```go\n")
	if !ok {
		t.Fatal("README.md has no ```go block")
	}
	prog, _, ok := strings.Cut(rest, "\n```")
	if !ok {
		t.Fatal("README.md: the ```go block does not end")
	}
	src := filepath.Join(t.TempDir(), "main.go")
	if err := os.WriteFile(src, []byte(prog+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Built from this module's directory, so its import of restore is this
	// tree's restore.
	if out, err := exec.Command("go", "vet", src).CombinedOutput(); err != nil {
		t.Errorf("README.md's Go program does not compile:\n%s\n%s", out, prog)
	}
}
