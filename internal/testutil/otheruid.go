package testutil

import (
	"io"
	"os"
	"path/filepath"
	"testing"
)

// SharedTempDir makes a 0755 temporary directory, removed when the test
// ends, so that a child running as another uid (65534) can reach what is
// in it (t.TempDir is 0700).
func SharedTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "uffdrestore-shared-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// CopyTestBinary copies the running test binary into dir as name (mode
// 0755) and returns its path: the binary itself sits in the go tool's 0700
// build directory, where another uid cannot run it.
func CopyTestBinary(t testing.TB, dir, name string) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, name)
	if err := copyFile(exe, dst, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
