// Package benchcache owns where uffdrestore keeps generated benchmark
// inputs (snapshots and raw images) between runs: a directory of the user
// running it, never one shared by all users.
//
// The directory is $XDG_CACHE_HOME/uffdrestore/bench, else
// $HOME/.cache/uffdrestore/bench; when neither can be created (no usable
// home, e.g. uid 65534 with HOME=/nonexistent) it is
// $TMPDIR/uffdrestore-bench-UID, which must then be owned by this uid and
// closed to others. UFFDRESTORE_BENCH_CACHE overrides all of them.
package benchcache

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
)

// Dir returns the cache directory of this user, created mode 0700.
func Dir() (string, error) {
	if d := os.Getenv("UFFDRESTORE_BENCH_CACHE"); d != "" {
		return d, ensure(d)
	}
	if base, err := os.UserCacheDir(); err == nil {
		d := filepath.Join(base, "uffdrestore", "bench")
		if ensure(d) == nil {
			return d, nil
		}
	}
	d := filepath.Join(os.TempDir(), "uffdrestore-bench-"+strconv.Itoa(os.Geteuid()))
	return d, ensure(d)
}

// ensure creates d (mode 0700) if needed and checks that it is a directory
// of this uid that no one else may write: a directory planted by another
// user in a shared parent is refused, never used.
func ensure(d string) error {
	if err := os.MkdirAll(d, 0o700); err != nil {
		return fmt.Errorf("benchmark cache %s: %w (set UFFDRESTORE_BENCH_CACHE to a directory of yours)", d, err)
	}
	fi, err := os.Lstat(d)
	if err != nil {
		return fmt.Errorf("benchmark cache %s: %w", d, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok || int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("benchmark cache %s is not a directory of uid %d closed to others (owner uid %d, mode %v): remove it, or set UFFDRESTORE_BENCH_CACHE to a directory of yours",
			d, os.Geteuid(), ownerOf(fi), fi.Mode())
	}
	return nil
}

func ownerOf(fi os.FileInfo) int {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid)
	}
	return -1
}

// Clear removes the cache directory of this user and everything in it, and
// returns its path and the bytes freed.
func Clear() (string, int64, error) {
	d, err := Dir()
	if err != nil {
		return d, 0, err
	}
	var n int64
	filepath.Walk(d, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return d, n, os.RemoveAll(d)
}
