package uffd

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	if os.Getenv("UFFD_TEST_CHILD") == "poison" {
		poisonChild()
		return
	}
	os.Exit(testutil.Main(m))
}

// TestABI pins the values the gateway takes from <linux/userfaultfd.h> (and
// the fallbacks csrc/ur_shim.h defines for older headers) to the kernel's
// ABI, which never changes once released: a wrong header or fallback fails
// here, not as a fault that never resolves.
func TestABI(t *testing.T) {
	pins := []struct {
		name      string
		got, want uint64
	}{
		{"sizeof(struct uffd_msg)", msgSize, 32},
		{"offsetof(event)", offEvent, 0},
		{"offsetof(pagefault.flags)", offPFFlags, 8},
		{"offsetof(pagefault.address)", offPFAddress, 16},
		{"offsetof(pagefault.feat.ptid)", offPFPtid, 24},
		{"offsetof(fork.ufd)", offForkUFD, 8},
		{"offsetof(remap.from)", offRemapFrom, 8},
		{"offsetof(remap.to)", offRemapTo, 16},
		{"offsetof(remap.len)", offRemapLen, 24},
		{"offsetof(remove.start)", offRemoveStart, 8},
		{"offsetof(remove.end)", offRemoveEnd, 16},
		{"UFFD_FEATURE_EVENT_FORK", uint64(FeatureEventFork), 1 << 1},
		{"UFFD_FEATURE_EVENT_REMAP", uint64(FeatureEventRemap), 1 << 2},
		{"UFFD_FEATURE_EVENT_REMOVE", uint64(FeatureEventRemove), 1 << 3},
		{"UFFD_FEATURE_MISSING_HUGETLBFS", uint64(FeatureMissingHugetlbfs), 1 << 4},
		{"UFFD_FEATURE_MISSING_SHMEM", uint64(FeatureMissingShmem), 1 << 5},
		{"UFFD_FEATURE_EVENT_UNMAP", uint64(FeatureEventUnmap), 1 << 6},
		{"UFFD_FEATURE_SIGBUS", uint64(FeatureSigbus), 1 << 7},
		{"UFFD_FEATURE_THREAD_ID", uint64(FeatureThreadID), 1 << 8},
		{"UFFD_FEATURE_MINOR_HUGETLBFS", uint64(FeatureMinorHugetlbfs), 1 << 9},
		{"UFFD_FEATURE_MINOR_SHMEM", uint64(FeatureMinorShmem), 1 << 10},
		{"UFFD_FEATURE_EXACT_ADDRESS", uint64(FeatureExactAddress), 1 << 11},
		{"UFFD_FEATURE_WP_HUGETLBFS_SHMEM", uint64(FeatureWPHugetlbfsShmem), 1 << 12},
		{"UFFD_FEATURE_POISON", uint64(FeaturePoison), 1 << 14},
		{"UFFD_FEATURE_MOVE", uint64(FeatureMove), 1 << 16},
		{"UFFDIO_REGISTER_MODE_MISSING", uint64(ModeMissing), 1 << 0},
		{"UFFDIO_REGISTER_MODE_WP", uint64(ModeWP), 1 << 1},
		{"UFFDIO_REGISTER_MODE_MINOR", uint64(ModeMinor), 1 << 2},
		{"UFFD_EVENT_PAGEFAULT", uint64(EventPagefault), 0x12},
		{"UFFD_EVENT_FORK", uint64(EventFork), 0x13},
		{"UFFD_EVENT_REMAP", uint64(EventRemap), 0x14},
		{"UFFD_EVENT_REMOVE", uint64(EventRemove), 0x15},
		{"UFFD_EVENT_UNMAP", uint64(EventUnmap), 0x16},
		{"UFFD_PAGEFAULT_FLAG_WRITE", PFWrite, 1 << 0},
		{"UFFD_PAGEFAULT_FLAG_WP", PFWP, 1 << 1},
		{"UFFD_PAGEFAULT_FLAG_MINOR", PFMinor, 1 << 2},
		{"1<<_UFFDIO_REGISTER", IoctlRegister, 1 << 0x00},
		{"1<<_UFFDIO_UNREGISTER", IoctlUnregister, 1 << 0x01},
		{"1<<_UFFDIO_WAKE", IoctlWake, 1 << 0x02},
		{"1<<_UFFDIO_COPY", IoctlCopy, 1 << 0x03},
		{"1<<_UFFDIO_ZEROPAGE", IoctlZeropage, 1 << 0x04},
		{"1<<_UFFDIO_CONTINUE", IoctlContinue, 1 << 0x07},
		{"1<<_UFFDIO_POISON", IoctlPoison, 1 << 0x08},
		{"1<<_UFFDIO_API", IoctlAPI, 1 << 0x3F},
		{"UFFDIO_CONTINUE_MODE_DONTWAKE", uint64(continueDontWake), 1 << 0},
		{"UFFDIO_COPY_MODE_DONTWAKE", uint64(copyDontWake), 1 << 0},
		{"UFFDIO_ZEROPAGE_MODE_DONTWAKE", uint64(zeropageDontWake), 1 << 0},
		{"UFFDIO_POISON_MODE_DONTWAKE", uint64(poisonDontWake), 1 << 0},
	}
	for _, p := range pins {
		if p.got != p.want {
			t.Errorf("%s: %#x, the kernel ABI is %#x", p.name, p.got, p.want)
		}
	}
}

// TestABIKernel checks the ioctl bits against what the running kernel
// reports: UFFDIO_API answers with UFFD_API_IOCTLS (API, REGISTER,
// UNREGISTER), a registered shmem range offers WAKE and CONTINUE.
func TestABIKernel(t *testing.T) {
	testutil.RequireRoot(t)
	_, ioctls, err := Supported(OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := IoctlAPI | IoctlRegister | IoctlUnregister; ioctls&want != want {
		t.Errorf("UFFDIO_API reported ioctls %#x, want %#x among them", ioctls, want)
	}
	u := need(t, FeatureMinorShmem)
	fd, page := backing(t, shmemMemfd, 1)
	m, err := Mmap(0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, fd, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	r, err := u.Register(m.Addr(), uintptr(page), ModeMinor)
	if err != nil {
		t.Fatal(err)
	}
	if want := IoctlWake | IoctlContinue; r&want != want {
		t.Errorf("a minor shmem range offers ioctls %#x, want %#x among them", r, want)
	}
}

func TestDecodeMsg(t *testing.T) {
	b := make([]byte, msgSize)
	b[offEvent] = byte(EventPagefault)
	b[offPFFlags] = byte(PFMinor | PFWrite)
	b[offPFAddress+1] = 0x20 // 0x2000
	b[offPFPtid] = 7
	m := decodeMsg(b)
	if m.Event != EventPagefault || m.Address != 0x2000 || m.Flags != PFMinor|PFWrite || m.PTID != 7 {
		t.Fatalf("decodeMsg = %+v", m)
	}
}

// need opens a uffd with features, skipping (or failing when strict) only
// when the kernel truly lacks them.
func need(t *testing.T, want Features) *FD {
	t.Helper()
	testutil.RequireRoot(t)
	u, err := Open(OpenOptions{NonBlock: true}, want)
	if errors.Is(err, ErrNotSupported) {
		testutil.Skip(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	return u
}

type backingKind int

const (
	hugetlbFile backingKind = iota
	hugetlbMemfd
	shmemMemfd
)

func (k backingKind) String() string {
	return [...]string{"hugetlbfs-file", "hugetlb-memfd", "shmem-memfd"}[k]
}

// backing creates a backing file of pages pages and returns its fd and page size.
func backing(t *testing.T, k backingKind, pages int) (int, int) {
	t.Helper()
	var fd int
	var err error
	page := os.Getpagesize()
	switch k {
	case hugetlbFile:
		testutil.RequireHugePages(t, int64(pages))
		dir := testutil.MountHugetlbfs(t)
		p := filepath.Join(dir, "uffdrestore-backing")
		fd, err = unix.Open(p, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
		if err == nil {
			unix.Unlink(p)
		}
		page = int(DefaultHugePageSize())
	case hugetlbMemfd:
		testutil.RequireHugePages(t, int64(pages))
		var f *File
		f, err = MemfdCreate("uffdrestore-test", true, 0)
		fd = f.Release()
		page = int(DefaultHugePageSize())
	case shmemMemfd:
		var f *File
		f, err = MemfdCreate("uffdrestore-test", false, 0)
		fd = f.Release()
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := Ftruncate(fd, int64(pages*page)); err != nil {
		t.Fatal(err)
	}
	return fd, page
}

func mmap(t *testing.T, fd, n, flags int) *Mapping {
	t.Helper()
	m, err := Mmap(0, n, unix.PROT_READ|unix.PROT_WRITE, flags, fd, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func pattern(page, i int) byte { return byte(i*7 + 1 + page%251) }

// handler serves faults on u for view: it fills the faulting page through
// alias (unless already filled) and resolves it with CONTINUE. It counts
// faults by kind and stops when stop is closed.
type handler struct {
	u           *FD
	view, alias *Mapping
	page        int
	prefilled   bool // pages were written before registration (MINOR only)
	minor       atomic.Int64
	missing     atomic.Int64
	errs        chan error
	stop        chan struct{}
	wg          sync.WaitGroup
}

func startHandler(t *testing.T, u *FD, view, alias *Mapping, page int, prefilled bool) *handler {
	h := &handler{u: u, view: view, alias: alias, page: page, prefilled: prefilled, errs: make(chan error, 16), stop: make(chan struct{})}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		defer unix.Close(efd)
		buf := NewMsgBuf(16)
		msgs := make([]Msg, 16)
		for {
			ready, woken, hup, err := Poll(u.Fd(), efd, 100)
			if err != nil {
				h.errs <- err
				return
			}
			select {
			case <-h.stop:
				return
			default:
			}
			if woken || hup {
				return
			}
			if !ready {
				continue
			}
			n, err := u.ReadMsgs(buf, msgs)
			if err != nil {
				h.errs <- err
				return
			}
			for _, m := range msgs[:n] {
				if m.Event != EventPagefault {
					continue
				}
				off := int(uintptr(m.Address)-view.Addr()) &^ (page - 1)
				if m.Flags&PFMinor != 0 {
					h.minor.Add(1)
				} else {
					h.missing.Add(1)
				}
				if !h.prefilled {
					fill(alias.Bytes()[off:off+page], off/page)
				}
				if _, err := u.Continue(view.Addr()+uintptr(off), uintptr(page), false); err != nil {
					h.errs <- err
					return
				}
			}
		}
	}()
	t.Cleanup(func() {
		close(h.stop)
		h.wg.Wait()
		select {
		case err := <-h.errs:
			t.Errorf("handler: %v", err)
		default:
		}
	})
	return h
}

func fill(b []byte, idx int) {
	for i := range b {
		b[i] = pattern(idx, i)
	}
}

// TestMinorRoundTrip mirrors the kernel selftest's "minor" case: two
// mappings of one file, the view registered MINOR, pages filled through the
// alias, faults resolved with CONTINUE.
func TestMinorRoundTrip(t *testing.T) {
	for _, k := range []backingKind{hugetlbFile, hugetlbMemfd, shmemMemfd} {
		t.Run(k.String(), func(t *testing.T) {
			feat := FeatureMinorShmem
			if k != shmemMemfd {
				feat = FeatureMinorHugetlbfs
			}
			u := need(t, feat)
			const pages = 4
			fd, page := backing(t, k, pages)
			size := pages * page
			alias := mmap(t, fd, size, unix.MAP_SHARED)
			// Fill the page cache first (MINOR only fires for pages present in it).
			for i := 0; i < pages; i++ {
				fill(alias.Bytes()[i*page:(i+1)*page], i)
			}
			view := mmap(t, fd, size, unix.MAP_SHARED)
			ioctls, err := u.Register(view.Addr(), uintptr(size), ModeMinor)
			if err != nil {
				t.Fatal(err)
			}
			if ioctls&IoctlContinue == 0 {
				t.Fatalf("register MINOR: CONTINUE not offered (ioctls %#x)", ioctls)
			}
			h := startHandler(t, u, view, alias, page, true)
			// Touch from C so this goroutine's P is free for the handler.
			touch.Touch(view.Addr(), size, page, false, nil, nil)
			if got := h.minor.Load(); got != pages {
				t.Errorf("minor faults = %d, want %d (one per page touched)", got, pages)
			}
			if h.missing.Load() != 0 {
				t.Errorf("missing faults = %d, want 0", h.missing.Load())
			}
			if !bytes.Equal(view.Bytes(), alias.Bytes()) {
				t.Fatal("view differs from alias after CONTINUE")
			}
			for i := 0; i < pages; i++ {
				if view.Bytes()[i*page+5] != pattern(i, 5) {
					t.Fatalf("page %d: wrong content", i)
				}
			}
			// A second CONTINUE of a mapped range is "already mapped", not an error.
			out, err := u.Continue(view.Addr(), uintptr(page), false)
			if err != nil || out != AlreadyMapped {
				t.Fatalf("second CONTINUE = %v, %v; want AlreadyMapped, nil", out, err)
			}
			// ContinueRange steps over mapped pages: unmap page 1 and 3,
			// then map the whole range again.
			view.Madvise(page, page, unix.MADV_DONTNEED)
			view.Madvise(3*page, page, unix.MADV_DONTNEED)
			calls, err := u.ContinueRange(view.Addr(), uintptr(size), uintptr(page))
			if err != nil || calls < 3 {
				t.Fatalf("ContinueRange over a partly mapped range: %d calls, %v", calls, err)
			}
			before := h.minor.Load()
			touch.Touch(view.Addr(), size, page, false, nil, nil)
			if h.minor.Load() != before {
				t.Fatalf("pages still faulted after ContinueRange")
			}
			if err := u.Unregister(view.Addr(), uintptr(size)); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestMissingMinorNoPrealloc registers MISSING|MINOR on a file with no pages
// allocated: the first touch is a MISSING fault, filled through the alias
// (which allocates the page) and resolved with CONTINUE.
func TestMissingMinorNoPrealloc(t *testing.T) {
	for _, k := range []backingKind{hugetlbMemfd, shmemMemfd} {
		t.Run(k.String(), func(t *testing.T) {
			feat := FeatureMinorShmem | FeatureMissingShmem
			if k != shmemMemfd {
				feat = FeatureMinorHugetlbfs | FeatureMissingHugetlbfs
			}
			u := need(t, feat)
			const pages = 3
			fd, page := backing(t, k, pages)
			size := pages * page
			alias := mmap(t, fd, size, unix.MAP_SHARED)
			view := mmap(t, fd, size, unix.MAP_SHARED)
			if _, err := u.Register(view.Addr(), uintptr(size), ModeMinor|ModeMissing); err != nil {
				t.Fatal(err)
			}
			h := startHandler(t, u, view, alias, page, false)
			touch.Touch(view.Addr(), size, page, true, []uint32{2, 0, 1}, nil)
			if got := h.missing.Load() + h.minor.Load(); got != pages {
				t.Errorf("faults = %d, want %d", got, pages)
			}
			if h.missing.Load() == 0 {
				t.Errorf("no MISSING fault seen without pre-allocation")
			}
			for i := 0; i < pages; i++ {
				want := make([]byte, page)
				fill(want, i)
				if !bytes.Equal(view.Bytes()[i*page:(i+1)*page], want) {
					t.Fatalf("page %d: wrong content", i)
				}
			}
		})
	}
}

// TestPrivateView: a MAP_PRIVATE view registered MINOR reads the shared
// pages; a write gives the view a private copy and leaves the alias alone.
func TestPrivateView(t *testing.T) {
	for _, k := range []backingKind{hugetlbMemfd, shmemMemfd} {
		t.Run(k.String(), func(t *testing.T) {
			feat := FeatureMinorShmem
			if k != shmemMemfd {
				feat = FeatureMinorHugetlbfs
			}
			u := need(t, feat)
			const pages = 2
			fd, page := backing(t, k, pages)
			size := pages * page
			alias := mmap(t, fd, size, unix.MAP_SHARED)
			for i := 0; i < pages; i++ {
				fill(alias.Bytes()[i*page:(i+1)*page], i)
			}
			view := mmap(t, fd, size, unix.MAP_PRIVATE)
			if _, err := u.Register(view.Addr(), uintptr(size), ModeMinor); err != nil {
				t.Fatal(err)
			}
			h := startHandler(t, u, view, alias, page, true)
			touch.Touch(view.Addr(), size, page, true, nil, nil) // write faults: minor, then copy-on-write
			if h.minor.Load() != pages {
				t.Errorf("minor faults = %d, want %d", h.minor.Load(), pages)
			}
			view.Bytes()[10] ^= 0xff
			if alias.Bytes()[10] != pattern(0, 10) {
				t.Fatal("a write to the private view changed the alias")
			}
			if view.Bytes()[10] != pattern(0, 10)^0xff || view.Bytes()[page+3] != pattern(1, 3) {
				t.Fatal("private view content wrong")
			}
		})
	}
}

// TestPoisonSIGBUS: a poisoned page raises SIGBUS in whoever touches it.
// The touch happens in a child process, which must die of SIGBUS.
func TestPoisonSIGBUS(t *testing.T) {
	u := need(t, FeatureMinorHugetlbfs|FeaturePoison)
	u.Close()
	testutil.RequireHugePages(t, 1)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "UFFD_TEST_CHILD=poison")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("child did not fail: err=%v output:\n%s", err, out)
	}
	if !strings.Contains(string(out), "signal SIGBUS") || !strings.Contains(string(out), "poisoned-page-touched") {
		t.Fatalf("child did not die of SIGBUS on the poisoned page; output:\n%s", out)
	}
	if strings.Contains(string(out), "read-returned") {
		t.Fatalf("poisoned page was readable:\n%s", out)
	}
}

func poisonChild() {
	die := func(err error) { os.Stderr.WriteString("child setup: " + err.Error() + "\n"); os.Exit(3) }
	u, err := Open(OpenOptions{NonBlock: true}, FeatureMinorHugetlbfs|FeaturePoison)
	if err != nil {
		die(err)
	}
	f, err := MemfdCreate("uffdrestore-poison", true, 0)
	if err != nil {
		die(err)
	}
	defer f.Close()
	fd := f.Fd()
	page := int(DefaultHugePageSize())
	if err := Ftruncate(fd, int64(page)); err != nil {
		die(err)
	}
	view, err := Mmap(0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, fd, 0)
	if err != nil {
		die(err)
	}
	if _, err := u.Register(view.Addr(), uintptr(page), ModeMinor|ModeMissing); err != nil {
		die(err)
	}
	if err := u.Poison(view.Addr(), uintptr(page), false); err != nil {
		die(err)
	}
	os.Stderr.WriteString("poisoned-page-touched\n")
	v := view.Bytes()[100] // must raise SIGBUS; the Go runtime prints "signal SIGBUS"
	os.Stderr.WriteString("read-returned " + string(rune('0'+v%10)) + "\n")
	os.Exit(0)
}

// TestErrorPaths: errors come back as errnos errors.Is can test.
func TestErrorPaths(t *testing.T) {
	u := need(t, FeatureMinorShmem)
	// Registering a range that is not mapped.
	m := mmap(t, -1, 1<<20, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	addr := m.Addr()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := u.Register(addr, 1<<20, ModeMinor); err == nil {
		t.Fatal("register of an unmapped range succeeded")
	} else if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("register unmapped: %v, want EINVAL or ENOMEM", err)
	}
	// MINOR on anonymous memory is refused with EINVAL.
	anon := mmap(t, -1, 1<<20, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if _, err := u.Register(anon.Addr(), 1<<20, ModeMinor); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("MINOR on anonymous memory: %v, want EINVAL", err)
	}
	var se *os.SyscallError
	_, err := u.Register(anon.Addr(), 1<<20, ModeMinor)
	if !errors.As(err, &se) || se.Syscall != "ioctl UFFDIO_REGISTER" {
		t.Fatalf("error %v does not name the ioctl", err)
	}
	// Close is idempotent.
	v := FromFD(mustDup(t, u.Fd()), u.Features())
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("second Close = %v, want os.ErrClosed", err)
	}
	if _, err := v.Continue(anon.Addr(), 4096, false); !errors.Is(err, unix.EBADF) {
		t.Fatalf("Continue after Close = %v, want EBADF", err)
	}
}

// TestFeaturesEnabled: Features is what this fd has enabled, not the
// kernel's list of everything it supports (UFFDIO_API answers with that).
func TestFeaturesEnabled(t *testing.T) {
	u := need(t, FeatureMinorShmem)
	if got := u.Features(); got != FeatureMinorShmem {
		t.Fatalf("Features() = %#x after asking for minor faults on shmem (%#x) only", uint64(got), uint64(FeatureMinorShmem))
	}
	if u.Features()&FeatureEventFork != 0 {
		t.Fatal("fork events reported on an fd that did not ask for them")
	}
}

// TestNoHugePagesFree: asking for more huge pages than the pool has fails at
// mmap with ENOMEM (the reservation), never with a SIGBUS later.
func TestNoHugePagesFree(t *testing.T) {
	testutil.RequireRoot(t)
	free := testutil.FreeHugePages()
	f, err := MemfdCreate("uffdrestore-toobig", true, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := f.Fd()
	page := DefaultHugePageSize()
	size := (free + 1 + 16) * page
	if err := Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	m, err := Mmap(0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, fd, 0)
	if err == nil {
		m.Close()
		t.Fatalf("mapping %d huge pages with %d free succeeded", size/page, free)
	}
	if !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("mmap beyond the pool: %v, want ENOMEM", err)
	}
}

func TestNotSupportedError(t *testing.T) {
	err := missingFeatureError(FeaturePoison)
	if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "requires Linux >= 6.6") {
		t.Fatalf("missingFeatureError = %v", err)
	}
}

func TestProbe(t *testing.T) {
	r := Probe()
	if r.Kernel == "" || r.KernelMajor == 0 {
		t.Fatalf("no kernel version: %+v", r)
	}
	if os.Geteuid() != 0 {
		testutil.Skip(t, "probe checks below need root")
	}
	if r.UffdErr != nil {
		t.Fatalf("root cannot open a userfaultfd: %v", r.UffdErr)
	}
	if !r.Permission.SyscallFull {
		t.Errorf("root: userfaultfd(2) reported unavailable")
	}
	if r.MinorShmemMemfd != nil {
		if errors.Is(r.MinorShmemMemfd, ErrNotSupported) {
			testutil.Skip(t, "%v", r.MinorShmemMemfd)
		}
		t.Errorf("minor faults on shmem: %v", r.MinorShmemMemfd)
	}
	if len(r.HugePools) == 0 {
		t.Errorf("no huge page pools found in /sys/kernel/mm/hugepages")
	}
	if testutil.FreeHugePages() > 0 && r.MinorHugetlbMemfd != nil {
		t.Errorf("minor faults on hugetlb memfd: %v", r.MinorHugetlbMemfd)
	}
}

func mustDup(t *testing.T, fd int) int {
	n, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestResidentVecSize: mincore writes a byte per base page, also on a huge
// page mapping; Resident refuses a vector too short for that.
func TestResidentVecSize(t *testing.T) {
	testutil.RequireHugePages(t, 1)
	fd, page := backing(t, hugetlbMemfd, 1)
	m := mmap(t, fd, page, unix.MAP_SHARED)
	m.Bytes()[0] = 1
	if err := m.Resident(0, page, make([]byte, 1)); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Resident with a 1-byte vector for a huge page: %v, want EINVAL", err)
	}
	vec := make([]byte, page/os.Getpagesize()+8)
	for i := range vec {
		vec[i] = 0xee
	}
	if err := m.Resident(0, page, vec); err != nil {
		t.Fatal(err)
	}
	if vec[0]&1 == 0 || vec[len(vec)-1] != 0xee {
		t.Fatalf("mincore vector: first %#x, guard %#x", vec[0], vec[len(vec)-1])
	}
}

// TestUserModeOnlyFallback: a user who may not open a full userfaultfd
// (here: this test's thread switched to uid 65534) gets a
// UFFD_USER_MODE_ONLY one when it asks for the fallback, and it serves
// minor faults on shmem.
func TestUserModeOnlyFallback(t *testing.T) {
	testutil.RequireRoot(t)
	type result struct {
		full    error
		via     Via
		fallErr error
		regErr  error
	}
	ch := make(chan result)
	go func() {
		// Credentials are per thread: change this one's and let it die
		// with the goroutine (it stays locked).
		runtime.LockOSThread()
		var res result
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, 65534, 65534, 0); e != 0 {
			res.full = e
			ch <- res
			return
		}
		_, res.full = Open(OpenOptions{}, 0)
		u, err := Open(OpenOptions{FallbackUserModeOnly: true}, FeatureMinorShmem)
		res.fallErr = err
		if err == nil {
			res.via = u.Via()
			f, _ := MemfdCreate("uffdrestore-umo", false, 0)
			Ftruncate(f.Fd(), 1<<16)
			m, merr := Mmap(0, 1<<16, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, f.Fd(), 0)
			if merr == nil {
				_, res.regErr = u.Register(m.Addr(), 1<<16, ModeMinor)
				m.Close()
			} else {
				res.regErr = merr
			}
			f.Close()
			u.Close()
		}
		ch <- res
	}()
	res := <-ch
	if res.full == nil {
		t.Fatal("uid 65534 opened a full userfaultfd with vm.unprivileged_userfaultfd=0 and /dev/userfaultfd 0600")
	}
	if !strings.Contains(res.full.Error(), "/dev/userfaultfd") || !strings.Contains(res.full.Error(), "doctor") {
		t.Errorf("refusal does not say what to do: %v", res.full)
	}
	if res.fallErr != nil || res.via != ViaUserModeOnly || res.regErr != nil {
		t.Fatalf("user-mode-only fallback: via %v, open %v, register %v", res.via, res.fallErr, res.regErr)
	}
}

// The fault path allocates nothing: reading no message and a CONTINUE that
// finds the page mapped (both through retry) cost no allocation.
func TestFaultPathDoesNotAllocate(t *testing.T) {
	u := need(t, FeatureMinorShmem)
	fd, page := backing(t, shmemMemfd, 1)
	if _, err := unix.Pwrite(fd, []byte{1}, 0); err != nil {
		t.Fatal(err)
	}
	m, err := Mmap(0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, fd, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if _, err := u.Register(m.Addr(), uintptr(page), ModeMinor); err != nil {
		t.Fatal(err)
	}
	if out, err := u.Continue(m.Addr(), uintptr(page), false); err != nil || out != Mapped {
		t.Fatalf("first CONTINUE: %v %v", out, err)
	}
	buf, msgs := NewMsgBuf(4), make([]Msg, 4)
	n := testing.AllocsPerRun(100, func() {
		if out, err := u.Continue(m.Addr(), uintptr(page), false); err != nil || out != AlreadyMapped {
			t.Fatalf("CONTINUE of a mapped page: %v %v", out, err)
		}
		if k, err := u.ReadMsgs(buf, msgs); k != 0 || err != nil {
			t.Fatalf("ReadMsgs: %d %v", k, err)
		}
	})
	if n != 0 {
		t.Fatalf("%v allocations per CONTINUE + read", n)
	}
}

// TestSupportedProbedOnce: the kernel's features are probed once per way of
// opening; a later probe opens no userfaultfd and an Open opens exactly one
// (a lazy restore.Open used to open three or four).
func TestSupportedProbedOnce(t *testing.T) {
	o := OpenOptions{NonBlock: true, FallbackUserModeOnly: true}
	f0, i0, err := Supported(o)
	if err != nil {
		t.Fatal(err)
	}
	n := opened.Load()
	f1, i1, err := Supported(o)
	if err != nil || f1 != f0 || i1 != i0 {
		t.Fatalf("second probe: %v, %#x/%#x against %#x/%#x", err, f1, i1, f0, i0)
	}
	if d := opened.Load() - n; d != 0 {
		t.Errorf("a second probe opened %d userfaultfds", d)
	}
	u, err := Open(o, 0)
	if err != nil {
		t.Fatal(err)
	}
	u.Close()
	if d := opened.Load() - n; d != 1 {
		t.Errorf("Open after a probe opened %d userfaultfds, want 1", d)
	}
}
