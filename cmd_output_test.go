package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore"
)

// TestOutputIsInputRefused: an output that is the input, under any spelling
// (another path, a symlink, a hard link, stdin redirected from it), is
// refused even with --force, and the input is left as it was.
func TestOutputIsInputRefused(t *testing.T) {
	dir := t.TempDir()
	img := snapTestImage()[:1<<20]
	raw := filepath.Join(dir, "heap.raw")
	os.WriteFile(raw, img, 0o644)
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	os.Symlink(raw, filepath.Join(dir, "link.raw"))
	os.Link(raw, filepath.Join(dir, "hard.raw"))
	for _, out := range []string{raw, filepath.Join(dir, "sub", "..", "heap.raw"), filepath.Join(dir, "link.raw"), filepath.Join(dir, "hard.raw")} {
		for _, force := range []bool{false, true} {
			args := []string{"snapshot", "create", "--from-file", raw, "-o", out, "-q"}
			if force {
				args = append(args, "--force")
			}
			code, _, stderr := runSnapCLI(t, args...)
			if code != 2 || !strings.Contains(stderr, "is the input") {
				t.Errorf("%q: exit %d, %q; want exit 2 naming the input", args, code, stderr)
			}
		}
	}
	// stdin redirected from the output file.
	in, _ := os.Open(raw)
	old := os.Stdin
	os.Stdin = in
	code, _, stderr := runSnapCLI(t, "snapshot", "create", "--from-file", "-", "-o", filepath.Join(dir, "hard.raw"), "-q", "--force")
	os.Stdin = old
	in.Close()
	if code != 2 || !strings.Contains(stderr, "is the input standard input") {
		t.Errorf("create from stdin onto it: exit %d, %q", code, stderr)
	}
	if got, _ := os.ReadFile(raw); !bytes.Equal(got, img) {
		t.Fatal("the input was changed")
	}

	// extract onto its snapshot, under another name.
	snap := filepath.Join(dir, "heap.snap")
	snapMustRun(t, "snapshot", "create", "--from-file", raw, "-o", snap, "-q")
	before, _ := os.ReadFile(snap)
	os.Symlink(snap, filepath.Join(dir, "snap.link"))
	code, _, stderr = runSnapCLI(t, "snapshot", "extract", snap, "-o", filepath.Join(dir, "snap.link"), "--force", "-q")
	if code != 2 || !strings.Contains(stderr, "is the input") {
		t.Errorf("extract onto the snapshot: exit %d, %q", code, stderr)
	}
	// reorder in place needs --force (the output keeps every byte).
	snapSidecar(t, snap, filepath.Join(dir, "p.json"), "boot", 0)
	code, _, stderr = runSnapCLI(t, "snapshot", "reorder", snap, "-o", filepath.Join(dir, "snap.link"), "--profile-file", filepath.Join(dir, "p.json"))
	if code != 2 || !strings.Contains(stderr, "give --force to rewrite it in place") {
		t.Errorf("reorder in place without --force: exit %d, %q", code, stderr)
	}
	code, _, stderr = runSnapCLI(t, "snapshot", "reorder", snap, "-o", filepath.Join(dir, "p.json"), "--profile-file", filepath.Join(dir, "p.json"), "--force")
	if code != 2 || !strings.Contains(stderr, "is the input") {
		t.Errorf("reorder onto its sidecar: exit %d, %q", code, stderr)
	}
	if after, _ := os.ReadFile(snap); !bytes.Equal(before, after) {
		t.Fatal("the snapshot was changed")
	}
}

// TestOutputExistsNeedsForce: an existing output is replaced only with
// --force, by every command that writes a file.
func TestOutputExistsNeedsForce(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "img.raw")
	os.WriteFile(raw, snapTestImage()[:1<<20], 0o644)
	snap := filepath.Join(dir, "img.snap")
	snapMustRun(t, "snapshot", "create", "--from-file", raw, "-o", snap, "-q", "--chunk-size", "64K")
	snapSidecar(t, snap, filepath.Join(dir, "p.json"), "boot", 3, 1)
	snapMustRun(t, "snapshot", "profile", "add", snap, "--from", filepath.Join(dir, "p.json"))
	victim := filepath.Join(dir, "victim")
	for _, args := range [][]string{
		{"snapshot", "create", "--from-file", raw, "-o", victim, "-q"},
		{"snapshot", "extract", snap, "-o", victim, "-q"},
		{"snapshot", "reorder", snap, "-o", victim, "-q"},
		{"snapshot", "profile", "export", snap, "-o", victim},
	} {
		os.WriteFile(victim, []byte("keep me"), 0o644)
		code, _, stderr := runSnapCLI(t, args...)
		if code == 0 || !strings.Contains(stderr, "--force") {
			t.Errorf("%q over an existing file: exit %d, %q", args, code, stderr)
		}
		if got, _ := os.ReadFile(victim); string(got) != "keep me" {
			t.Errorf("%q replaced the existing output without --force", args)
		}
		if code, _, stderr := runSnapCLI(t, append(args, "--force")...); code != 0 {
			t.Errorf("%q --force: exit %d, %q", args, code, stderr)
		}
	}
	if got, _ := os.ReadFile(victim); string(got) == "keep me" {
		t.Error("--force did not replace the output")
	}
}

// TestCreateEmptyInput: an empty image or empty stdin is an error that says
// so, and writes nothing; a 0-byte snapshot is refused by Open and load.
func TestCreateEmptyInput(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty.raw")
	os.WriteFile(empty, nil, 0o644)
	out := filepath.Join(dir, "e.snap")
	code, _, stderr := runSnapCLI(t, "snapshot", "create", "--from-file", empty, "-o", out)
	if code != 1 || !strings.Contains(stderr, "is empty (0 bytes)") {
		t.Errorf("empty file: exit %d, %q", code, stderr)
	}
	devnull, _ := os.Open(os.DevNull)
	old := os.Stdin
	os.Stdin = devnull
	code, _, stderr = runSnapCLI(t, "snapshot", "create", "--from-file", "-", "-o", out, "-q")
	os.Stdin = old
	devnull.Close()
	if code != 1 || !strings.Contains(stderr, "standard input gave 0 bytes, nothing to snapshot") {
		t.Errorf("empty stdin: exit %d, %q", code, stderr)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("files left: %v", ents)
	}

	// A snapshot of nothing (as older versions wrote): refused at open.
	f, _ := os.Create(out)
	w, err := format.NewWriter(f, format.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := restore.Open(t.Context(), out); !errors.Is(err, restore.ErrEmptySnapshot) {
		t.Errorf("restore.Open of an empty snapshot: %v", err)
	}
	if _, err := restore.NewLoader(t.Context(), out); !errors.Is(err, restore.ErrEmptySnapshot) {
		t.Errorf("restore.NewLoader of an empty snapshot: %v", err)
	}
	cmd := loadCmd("load", out, "--socket", filepath.Join(dir, "s.sock"))
	var b syncBuf
	cmd.Stdout, cmd.Stderr = &b, &b
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, cmd, 20*time.Second); code != 1 || !strings.Contains(b.String(), "holds no memory") || strings.Contains(b.String(), "ready") {
		t.Errorf("load of an empty snapshot: exit %d, %q", code, b.String())
	}
}

// TestBenchCache: bench says where its per-user cache is, --clear-cache
// removes it, and bench's outputs are checked before any run.
func TestBenchCache(t *testing.T) {
	cache := filepath.Join(t.TempDir(), "cache")
	t.Setenv("UFFDRESTORE_BENCH_CACHE", cache)
	os.MkdirAll(cache, 0o700)
	os.WriteFile(filepath.Join(cache, "gen-x.raw"), make([]byte, 3<<20), 0o600)
	code, stdout, stderr := runSnapCLI(t, "bench", "--clear-cache")
	if code != 0 || !strings.Contains(stdout, "removed the benchmark cache "+cache+" (3.0 MiB)") {
		t.Errorf("--clear-cache: exit %d, %q %q", code, stdout, stderr)
	}
	if _, err := os.Stat(cache); !os.IsNotExist(err) {
		t.Error("--clear-cache left the cache")
	}
	existing := filepath.Join(t.TempDir(), "out.json")
	os.WriteFile(existing, []byte("{}"), 0o644)
	start := time.Now()
	code, _, stderr = runSnapCLI(t, "bench", "--generate", "64MiB", "--json", existing, "-q")
	if code != 1 || !strings.Contains(stderr, "--json "+existing+" already exists: give --force") || time.Since(start) > 2*time.Second {
		t.Errorf("bench --json over an existing file: exit %d, %q after %v", code, stderr, time.Since(start))
	}
	if _, err := os.Stat(cache); !os.IsNotExist(err) {
		t.Error("bench generated before checking its outputs")
	}
}
