package engine

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// BackingKind says what memory a restore is loaded into.
type BackingKind int

// Backing kinds.
const (
	// BackingAuto picks a hugetlb memfd when the huge page pool has room
	// for the whole snapshot and the kernel has minor faults on hugetlbfs
	// for the userfaultfd this user can get (UFFD_USER_MODE_ONLY when not
	// root: the one the view will use), else a shmem memfd.
	BackingAuto BackingKind = iota
	// BackingHugetlbfs is a file in a hugetlbfs mount (WithHugetlbfsDir).
	// It cannot be sealed against shrinking.
	BackingHugetlbfs
	// BackingMemfdHugetlb is memfd_create(MFD_HUGETLB): huge pages, no mount.
	BackingMemfdHugetlb
	// BackingShmem is a plain shmem memfd with 4 KiB pages.
	BackingShmem
)

func (k BackingKind) String() string {
	switch k {
	case BackingHugetlbfs:
		return "hugetlbfs"
	case BackingMemfdHugetlb:
		return "memfd-hugetlb"
	case BackingShmem:
		return "shmem"
	}
	return "auto"
}

// ParseBacking parses auto, hugetlbfs, memfd (or memfd-hugetlb) and shmem.
func ParseBacking(s string) (BackingKind, error) {
	switch s {
	case "", "auto":
		return BackingAuto, nil
	case "hugetlbfs":
		return BackingHugetlbfs, nil
	case "memfd", "memfd-hugetlb", "hugetlb":
		return BackingMemfdHugetlb, nil
	case "shmem":
		return BackingShmem, nil
	}
	return 0, fmt.Errorf("restore: unknown backing %q (want auto, hugetlbfs, memfd or shmem)", s)
}

// hugetlb reports whether the kind uses huge pages.
func (k BackingKind) hugetlb() bool { return k == BackingHugetlbfs || k == BackingMemfdHugetlb }

// backing is the file a restore is loaded into.
type backing struct {
	kind     BackingKind
	fd       *uffd.File
	size     int64
	pageSize int
	sealed   bool
}

// ErrNoHugePages is returned (wrapped, with the numbers and the fix) when
// the huge page pool has no room for the snapshot.
var ErrNoHugePages = errors.New("restore: not enough free huge pages")

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// checkPool fails with the numbers and the fix when the default huge page
// pool cannot hold size bytes.
func checkPool(size int64) error {
	page := uffd.DefaultHugePageSize()
	need := roundUp(size, page) / page
	pool, _ := uffd.HugePoolOf(page)
	if avail := pool.Available(); avail < need {
		return fmt.Errorf("%w: the snapshot needs %d huge pages of %d KiB (%d MiB), %d are free (%d total, %d reserved): "+
			"as root run `echo %d > /proc/sys/vm/nr_hugepages`, or restore with --backing shmem",
			ErrNoHugePages, need, page>>10, need*page>>20, avail, pool.Total, pool.Reserved, pool.Total+need-avail)
	}
	return nil
}

// viewUffd is how a view's userfaultfd is opened: a user who may not handle
// kernel-mode faults (not root, no /dev/userfaultfd access) gets one with
// UFFD_USER_MODE_ONLY rather than none.
var viewUffd = uffd.OpenOptions{NonBlock: true, FallbackUserModeOnly: true}

// autoBacking is what BackingAuto resolves to for size bytes: a hugetlb
// memfd when the userfaultfd a view gets (viewUffd, so user-mode-only for a
// non-root user) offers minor faults on hugetlbfs and the pool has room for
// size, else shmem.
func autoBacking(size int64) BackingKind {
	feat, _, err := uffd.Supported(viewUffd)
	if err == nil && feat&uffd.FeatureMinorHugetlbfs != 0 && checkPool(size) == nil {
		return BackingMemfdHugetlb
	}
	return BackingShmem
}

// hugetlbfsHint says how to get a hugetlbfs mount: an existing writable one
// if there is, else how to mount one on a dedicated new directory (never on
// a directory that holds anything, which the mount would hide).
func hugetlbfsHint() string {
	for _, m := range uffd.HugetlbfsMounts() {
		if m.Writable {
			return fmt.Sprintf("use the mount at %s: --hugetlbfs %s", m.Path, m.Path)
		}
	}
	for _, d := range []string{"/dev/hugepages", "/run/uffdrestore-hugetlbfs"} {
		ents, err := os.ReadDir(d)
		if errors.Is(err, os.ErrNotExist) || (err == nil && len(ents) == 0) {
			return fmt.Sprintf("as root mount one on a directory of its own: `mkdir -p %s && mount -t hugetlbfs -o mode=0700 none %s`, then --hugetlbfs %s", d, d, d)
		}
	}
	return "as root create an empty directory (mkdir) and mount one there with `mount -t hugetlbfs -o mode=0700 none DIR`; never mount over a directory that holds files"
}

// newBacking creates a backing file of at least size bytes.
func newBacking(kind BackingKind, size int64, hugetlbfsDir string) (_ *backing, err error) {
	checked := false // the pool has room (autoBacking checked it)
	if kind == BackingAuto {
		kind = autoBacking(size)
		checked = kind.hugetlb()
	}
	b := &backing{kind: kind, pageSize: os.Getpagesize()}
	if kind.hugetlb() {
		b.pageSize = int(uffd.DefaultHugePageSize())
		if !checked {
			if err := checkPool(size); err != nil {
				return nil, err
			}
		}
	}
	b.size = roundUp(max(size, 1), int64(b.pageSize))
	defer func() {
		if err != nil {
			b.fd.Close()
		}
	}()
	switch kind {
	case BackingHugetlbfs:
		if hugetlbfsDir == "" {
			return nil, fmt.Errorf("restore: --backing hugetlbfs needs a hugetlbfs mount (--hugetlbfs DIR); %s", hugetlbfsHint())
		}
		var st unix.Statfs_t
		if err := unix.Statfs(hugetlbfsDir, &st); err != nil {
			return nil, fmt.Errorf("restore: hugetlbfs dir %s: %w", hugetlbfsDir, err)
		}
		if st.Type != unix.HUGETLBFS_MAGIC {
			return nil, fmt.Errorf("restore: %s is not a hugetlbfs mount; %s", hugetlbfsDir, hugetlbfsHint())
		}
		// A mount with a size= option has its own limit, below the pool's:
		// statfs reports it (f_blocks is 0 on a mount without one).
		if st.Blocks > 0 && int64(st.Bavail)*st.Bsize < b.size {
			need := roundUp(int64(st.Blocks)*st.Bsize-int64(st.Bavail)*st.Bsize+b.size, 1<<20)
			return nil, fmt.Errorf("%w: the hugetlbfs mount %s is limited by its size= option to %d MiB, %d MiB of it free; the snapshot needs %d MiB: "+
				"as root raise the limit with `mount -o remount,size=%dM %s`, or use --backing memfd (the pool has room)",
				ErrNoHugePages, hugetlbfsDir, int64(st.Blocks)*st.Bsize>>20, int64(st.Bavail)*st.Bsize>>20, b.size>>20, need>>20, hugetlbfsDir)
		}
		var rnd [8]byte
		rand.Read(rnd[:])
		p := filepath.Join(hugetlbfsDir, "uffdrestore-backing-"+hex.EncodeToString(rnd[:]))
		fd, err := unix.Open(p, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
		if err != nil {
			return nil, fmt.Errorf("restore: create backing in %s: %w (check the mount's uid/gid/mode options)", hugetlbfsDir, err)
		}
		b.fd = uffd.NewFile(fd)
		// Unlinked at once: the pages go back to the pool when the last
		// mapping and fd close, even if this process dies.
		unix.Unlink(p)
	case BackingMemfdHugetlb:
		if b.fd, err = uffd.MemfdCreate("uffdrestore-backing", true, 0); err != nil {
			return nil, fmt.Errorf("restore: create hugetlb memfd: %w", err)
		}
	case BackingShmem:
		if b.fd, err = uffd.MemfdCreate("uffdrestore-backing", false, 0); err != nil {
			return nil, fmt.Errorf("restore: create shmem memfd: %w", err)
		}
	default:
		return nil, fmt.Errorf("restore: unknown backing kind %d", kind)
	}
	if err := uffd.Ftruncate(b.fd.Fd(), b.size); err != nil {
		return nil, fmt.Errorf("restore: size backing to %d bytes: %w", b.size, err)
	}
	if kind != BackingHugetlbfs {
		if err := uffd.AddSeals(b.fd.Fd(), unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
			return nil, fmt.Errorf("restore: seal backing: %w", err)
		}
		b.sealed = true
	}
	return b, nil
}

// backingFromFD wraps an existing backing file (the in-process helper gets
// the parent's). It takes ownership of fd.
func backingFromFD(fd *uffd.File, kind BackingKind, size int64, pageSize int) *backing {
	return &backing{kind: kind, fd: fd, size: size, pageSize: pageSize}
}

func (b *backing) close() error { return b.fd.Close() }

// layoutName is the protocol's name for the backing's page type.
func (b *backing) layoutName() string {
	if b.kind.hugetlb() {
		return "hugetlb"
	}
	return "shmem"
}
