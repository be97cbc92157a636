package bench

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// MatrixBackings are the backings of `--backing all`: what a restore can
// load into (auto resolves to one of them).
var MatrixBackings = []restore.BackingKind{restore.BackingMemfdHugetlb, restore.BackingHugetlbfs, restore.BackingShmem}

// ParseBackings parses a comma-separated list of backings (auto,
// memfd-hugetlb, hugetlbfs, shmem; "all": MatrixBackings). Duplicates are
// dropped.
func ParseBackings(s string) ([]restore.BackingKind, error) {
	var out []restore.BackingKind
	add := func(k restore.BackingKind) {
		for _, o := range out {
			if o == k {
				return
			}
		}
		out = append(out, k)
	}
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if f == "all" {
			for _, k := range MatrixBackings {
				add(k)
			}
			continue
		}
		k, err := restore.ParseBacking(f)
		if err != nil {
			return nil, fmt.Errorf("bench: --backing: %w", err)
		}
		add(k)
	}
	if len(out) == 0 {
		return nil, errors.New("bench: --backing: no backing given (want auto, memfd-hugetlb, hugetlbfs, shmem or all)")
	}
	return out, nil
}

// HugetlbfsDir returns a writable hugetlbfs mount for a hugetlbfs backing:
// dir when given, else the first writable mount, else (as root) a private
// mount on a new temporary directory, which unmount removes. It fails with
// the fix when there is none.
func HugetlbfsDir(dir string) (path string, unmount func(), err error) {
	if dir != "" {
		return dir, func() {}, nil
	}
	for _, m := range uffd.HugetlbfsMounts() {
		if m.Writable {
			return m.Path, func() {}, nil
		}
	}
	if os.Geteuid() != 0 {
		return "", nil, errors.New("bench: --backing hugetlbfs: no writable hugetlbfs mount; pass --hugetlbfs DIR (as root, mount one with `mount -t hugetlbfs -o mode=0700 none DIR` on an empty directory)")
	}
	d, err := os.MkdirTemp("", "uffdrestore-bench-hugetlbfs-")
	if err != nil {
		return "", nil, err
	}
	if err := unix.Mount("none", d, "hugetlbfs", 0, "mode=0700"); err != nil {
		os.Remove(d)
		return "", nil, fmt.Errorf("bench: --backing hugetlbfs: mount a hugetlbfs on %s: %w (pass --hugetlbfs DIR)", d, err)
	}
	return d, func() { unix.Unmount(d, unix.MNT_DETACH); os.Remove(d) }, nil
}
