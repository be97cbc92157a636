package atomicfile

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// leftovers lists the files in dir other than the names given.
func leftovers(t *testing.T, dir string, keep ...string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		found := false
		for _, k := range keep {
			found = found || e.Name() == k
		}
		if !found {
			out = append(out, e.Name())
		}
	}
	return out
}

func readString(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestCommitReplacesOnlyOnCommit(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out")
	if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := Create(p, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Write([]byte("new content")); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, p); got != "old" {
		t.Fatalf("before Commit the destination holds %q, want the old content", got)
	}
	if filepath.Dir(a.Name()) != dir {
		t.Fatalf("temporary %s is not in the destination's directory %s", a.Name(), dir)
	}
	if err := a.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, p); got != "new content" {
		t.Fatalf("after Commit: %q", got)
	}
	st, _ := os.Stat(p)
	if st.Mode().Perm() != 0o644 {
		t.Fatalf("mode %v, want 0644", st.Mode().Perm())
	}
	if l := leftovers(t, dir, "out"); len(l) != 0 {
		t.Fatalf("left behind: %v", l)
	}
	if err := a.Commit(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("second Commit: %v, want os.ErrClosed", err)
	}
	a.Abort() // after Commit: a no-op, the file stays
	if got := readString(t, p); got != "new content" {
		t.Fatalf("Abort after Commit changed the file: %q", got)
	}
}

func TestAbortLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out")
	a, err := Create(p, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	a.Write([]byte("partial"))
	a.Abort()
	a.Abort()
	if l := leftovers(t, dir); len(l) != 0 {
		t.Fatalf("left behind: %v", l)
	}
}

// Two writers of one path at once each have their own temporary: neither
// truncates or renames the other's (a fixed "path.tmp" would).
func TestConcurrentWritersDoNotShareTemporaries(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out")
	a, err := Create(p, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Create(p, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if a.Name() == b.Name() {
		t.Fatalf("both writers use %s", a.Name())
	}
	a.Write([]byte("aaaa"))
	b.Write([]byte("bb"))
	if err := a.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, p); got != "aaaa" {
		t.Fatalf("got %q", got)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, p); got != "bb" {
		t.Fatalf("got %q", got)
	}
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := WriteBytes(p, 0o644, []byte("same")); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if l := leftovers(t, dir, "out"); len(l) != 0 {
		t.Fatalf("left behind: %v", l)
	}
}

// A symbolic link at the destination is replaced, not followed: the file it
// points to is untouched.
func TestSymlinkIsReplacedNotFollowed(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	os.WriteFile(victim, []byte("keep me"), 0o600)
	p := filepath.Join(dir, "out")
	if err := os.Symlink(victim, p); err != nil {
		t.Fatal(err)
	}
	if err := WriteBytes(p, 0o644, []byte("new")); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, victim); got != "keep me" {
		t.Fatalf("the link's target was written: %q", got)
	}
	st, err := os.Lstat(p)
	if err != nil || st.Mode()&os.ModeSymlink != 0 || readString(t, p) != "new" {
		t.Fatalf("destination: %v %v", st.Mode(), err)
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Create(dir, 0o644); err == nil {
		t.Fatal("a directory as destination was accepted")
	}
	if _, err := Create(filepath.Join(dir, "missing", "out"), 0o644); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing directory: %v", err)
	}
}

// Every failure of Commit removes the temporary and leaves the destination
// as it was.
func TestCommitFailuresCleanUp(t *testing.T) {
	boom := errors.New("injected")
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir, p string)
	}{
		{"fsync", func(t *testing.T, dir, p string) {
			old := syncFile
			syncFile = func(*os.File) error { return boom }
			t.Cleanup(func() { syncFile = old })
		}},
		{"rename", func(t *testing.T, dir, p string) {
			// A non-empty directory appears at the destination: rename fails.
			os.Remove(p)
			os.MkdirAll(filepath.Join(p, "x"), 0o700)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "out")
			os.WriteFile(p, []byte("old"), 0o600)
			a, err := Create(p, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			a.Write([]byte("new"))
			tc.setup(t, dir, p)
			if err := a.Commit(); err == nil {
				t.Fatal("Commit succeeded")
			}
			if l := leftovers(t, dir, "out"); len(l) != 0 {
				t.Fatalf("left behind: %v", l)
			}
			if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && readString(t, p) != "old" {
				t.Fatal("the destination changed")
			}
		})
	}
	// The directory flush failing is reported (the content is in place).
	dir := t.TempDir()
	p := filepath.Join(dir, "out")
	old := syncDir
	syncDir = func(string) error { return boom }
	defer func() { syncDir = old }()
	if err := WriteBytes(p, 0o644, []byte("x")); !errors.Is(err, boom) {
		t.Fatalf("directory flush failure: %v", err)
	}
}

func TestWriteFileErrorLeavesOldContent(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out")
	os.WriteFile(p, []byte("old"), 0o600)
	boom := errors.New("encoder failed")
	err := WriteFile(p, 0o644, func(w io.Writer) error {
		w.Write([]byte("half"))
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("got %v", err)
	}
	if readString(t, p) != "old" {
		t.Fatal("the destination changed")
	}
	if l := leftovers(t, dir, "out"); len(l) != 0 {
		t.Fatalf("left behind: %v", l)
	}
}

func TestRandomAccess(t *testing.T) {
	p := filepath.Join(t.TempDir(), "out")
	a, err := Create(p, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	// Buffered writes are visible to ReadAt and Size at once.
	a.Write([]byte("ab"))
	if n, err := a.Size(); n != 2 || err != nil {
		t.Fatalf("Size after a buffered Write: %d %v", n, err)
	}
	if err := a.Truncate(8); err != nil {
		t.Fatal(err)
	}
	a.WriteAt([]byte("xy"), 6)
	buf := make([]byte, 2)
	if _, err := a.ReadAt(buf, 6); err != nil || string(buf) != "xy" {
		t.Fatalf("ReadAt: %q %v", buf, err)
	}
	if n, err := a.Size(); n != 8 || err != nil {
		t.Fatalf("Size %d %v", n, err)
	}
	if err := a.Commit(); err != nil {
		t.Fatal(err)
	}
	if readString(t, p) != "ab\x00\x00\x00\x00xy" {
		t.Fatal("content")
	}
}
