package uffd

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/uffdrestore/uffdrestore/internal/size"
)

// HugePool is one huge page size's pool, from /sys/kernel/mm/hugepages.
type HugePool struct {
	PageSize int64 `json:"page_size"`
	Total    int64 `json:"total"`
	Free     int64 `json:"free"`
	Reserved int64 `json:"reserved"`
	Surplus  int64 `json:"surplus"`
}

// Available is the number of pages a new mapping can still get.
func (p HugePool) Available() int64 { return p.Free - p.Reserved }

// HugetlbfsMount is a mounted hugetlbfs.
type HugetlbfsMount struct {
	Path     string `json:"path"`
	PageSize int64  `json:"page_size"`
	Writable bool   `json:"writable"`
}

// Permission is the userfaultfd permission model in force for this process.
type Permission struct {
	EUID                  int    `json:"euid"`
	User                  string `json:"user,omitempty"` // login name of EUID, if it has one
	CapSysPtrace          bool   `json:"cap_sys_ptrace"`
	UnprivilegedSysctl    int    `json:"vm_unprivileged_userfaultfd"` // -1: unknown
	DevPresent            bool   `json:"dev_userfaultfd_present"`
	DevMode               string `json:"dev_userfaultfd_mode,omitempty"`
	DevAccessible         bool   `json:"dev_userfaultfd_accessible"`
	SyscallFull           bool   `json:"syscall_full"`           // userfaultfd(2) without UFFD_USER_MODE_ONLY works
	SyscallUserModeOnly   bool   `json:"syscall_user_mode_only"` // userfaultfd(2) with UFFD_USER_MODE_ONLY works
	SyscallErr            string `json:"syscall_error,omitempty"`
	FullFaultHandlingNote string `json:"note,omitempty"`
}

// Report is what Probe finds.
type Report struct {
	Kernel      string           `json:"kernel"`
	KernelMajor int              `json:"kernel_major"`
	KernelMinor int              `json:"kernel_minor"`
	Features    map[string]bool  `json:"features"`
	FeatureBits uint64           `json:"feature_bits"`
	Ioctls      map[string]bool  `json:"ioctls"`
	Permission  Permission       `json:"permission"`
	HugePools   []HugePool       `json:"huge_pools"`
	Mounts      []HugetlbfsMount `json:"hugetlbfs_mounts"`
	// Functional checks: a view registered MINOR on each backing.
	MinorHugetlbMemfd error `json:"-"`
	MinorShmemMemfd   error `json:"-"`
	UffdErr           error `json:"-"`
}

// FeatureOK reports whether feature f was reported by the kernel.
func (r *Report) FeatureOK(f Features) bool { return Features(r.FeatureBits)&f == f }

// DefaultHugePool returns the pool of the default huge page size (2 MiB on
// x86-64), or a zero pool.
func (r *Report) DefaultHugePool() HugePool {
	def := DefaultHugePageSize()
	for _, p := range r.HugePools {
		if p.PageSize == def {
			return p
		}
	}
	return HugePool{PageSize: def}
}

// Probe inspects the kernel, the permission model and the huge page pools.
// It never fails: what it cannot find out is reported as missing.
func Probe() *Report {
	r := &Report{Features: map[string]bool{}, Ioctls: map[string]bool{}}
	var uts unix.Utsname
	if unix.Uname(&uts) == nil {
		r.Kernel = unix.ByteSliceToString(uts.Release[:])
		fmt.Sscanf(r.Kernel, "%d.%d", &r.KernelMajor, &r.KernelMinor)
	}
	r.Permission = probePermission()
	opts := OpenOptions{}
	if !r.Permission.SyscallFull && !r.Permission.DevAccessible && r.Permission.SyscallUserModeOnly {
		opts.UserModeOnly = true
	}
	feat, ioctls, err := Supported(opts)
	r.UffdErr = err
	r.FeatureBits = uint64(feat)
	for _, f := range KnownFeatures() {
		r.Features[f.Name] = feat&f.Bit != 0
	}
	for name, bit := range map[string]uint64{"UFFDIO_REGISTER": IoctlRegister, "UFFDIO_UNREGISTER": IoctlUnregister, "UFFDIO_API": IoctlAPI} {
		r.Ioctls[name] = ioctls&bit != 0
	}
	r.HugePools = HugePools()
	r.Mounts = HugetlbfsMounts()
	if err == nil {
		r.MinorHugetlbMemfd = probeMinor(true, opts)
		r.MinorShmemMemfd = probeMinor(false, opts)
	} else {
		r.MinorHugetlbMemfd, r.MinorShmemMemfd = err, err
	}
	return r
}

func probePermission() Permission {
	p := Permission{EUID: os.Geteuid(), UnprivilegedSysctl: -1}
	if u, err := user.LookupId(strconv.Itoa(p.EUID)); err == nil {
		p.User = u.Username
	}
	if b, err := os.ReadFile("/proc/sys/vm/unprivileged_userfaultfd"); err == nil {
		p.UnprivilegedSysctl, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	if caps, err := capEff(); err == nil {
		p.CapSysPtrace = caps&(1<<unix.CAP_SYS_PTRACE) != 0
	}
	if st, err := os.Stat("/dev/userfaultfd"); err == nil {
		p.DevPresent = true
		p.DevMode = st.Mode().String()
		p.DevAccessible = unix.Access("/dev/userfaultfd", unix.R_OK|unix.W_OK) == nil
	}
	if fd, _, err := openRaw(OpenOptions{Via: ViaSyscall}); err == nil {
		unix.Close(fd)
		p.SyscallFull = true
	} else {
		p.SyscallErr = err.Error()
	}
	if fd, _, err := openRaw(OpenOptions{Via: ViaSyscall, UserModeOnly: true}); err == nil {
		unix.Close(fd)
		p.SyscallUserModeOnly = true
	}
	if !p.SyscallFull && !p.DevAccessible && p.SyscallUserModeOnly {
		p.FullFaultHandlingNote = "only UFFD_USER_MODE_ONLY is available: faults the kernel raises on the target's behalf (read(2) into an unfilled page) fail with EFAULT instead of waiting"
	}
	return p
}

func capEff() (uint64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, errors.New("no CapEff in /proc/self/status")
}

// probeMinor maps a one-page memfd twice and registers the second mapping
// MINOR, which is what a lazy restore does. It needs one free huge page for
// the hugetlb case.
func probeMinor(hugetlb bool, o OpenOptions) (err error) {
	want := FeatureMinorShmem
	page := int64(os.Getpagesize())
	if hugetlb {
		want = FeatureMinorHugetlbfs
		page = DefaultHugePageSize()
	}
	u, err := Open(o, want)
	if err != nil {
		return err
	}
	defer u.Close()
	f, err := MemfdCreate("uffdrestore-probe", hugetlb, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := Ftruncate(f.Fd(), page); err != nil {
		return err
	}
	m, err := Mmap(0, int(page), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, f.Fd(), 0)
	if err != nil {
		return err
	}
	defer m.Close()
	_, err = u.Register(m.Addr(), uintptr(page), ModeMinor)
	return err
}

// DefaultHugePageSize reads Hugepagesize from /proc/meminfo (2 MiB if unknown).
func DefaultHugePageSize() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "Hugepagesize:"); ok {
				if f := strings.Fields(v); len(f) > 0 {
					if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
						return n << 10
					}
				}
			}
		}
	}
	return 2 << 20
}

// HugePools reads every pool under /sys/kernel/mm/hugepages.
func HugePools() []HugePool {
	dirs, _ := filepath.Glob("/sys/kernel/mm/hugepages/hugepages-*kB")
	var out []HugePool
	for _, d := range dirs {
		var kb int64
		if _, err := fmt.Sscanf(filepath.Base(d), "hugepages-%dkB", &kb); err != nil {
			continue
		}
		p, _ := readHugePool(d, kb<<10)
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PageSize < out[j].PageSize })
	return out
}

// HugePoolOf is the pool of pageSize-byte huge pages (what HugePools lists
// for that size, read alone: a restore checks one pool on its way to the
// first byte); ok is false when there is no such pool.
func HugePoolOf(pageSize int64) (p HugePool, ok bool) {
	p, err := readHugePool(fmt.Sprintf("/sys/kernel/mm/hugepages/hugepages-%dkB", pageSize>>10), pageSize)
	return p, err == nil
}

// readHugePool reads the pool in dir; err is the first file's error (no
// such pool).
func readHugePool(dir string, pageSize int64) (HugePool, error) {
	var first error
	rd := func(name string) int64 {
		b, err := os.ReadFile(filepath.Join(dir, name))
		first = cmp.Or(first, err)
		n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		return n
	}
	return HugePool{PageSize: pageSize, Total: rd("nr_hugepages"), Free: rd("free_hugepages"),
		Reserved: rd("resv_hugepages"), Surplus: rd("surplus_hugepages")}, first
}

// HugetlbfsMounts lists hugetlbfs mounts from /proc/self/mountinfo.
func HugetlbfsMounts() []HugetlbfsMount {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []HugetlbfsMount
	for _, l := range strings.Split(string(b), "\n") {
		// id parent maj:min root mountpoint opts ... - fstype source superopts
		pre, post, ok := strings.Cut(l, " - ")
		if !ok {
			continue
		}
		pf, sf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(sf) < 1 || sf[0] != "hugetlbfs" {
			continue
		}
		m := HugetlbfsMount{Path: unescapeMount(pf[4]), PageSize: DefaultHugePageSize()}
		if len(sf) >= 3 {
			for _, o := range strings.Split(sf[2], ",") {
				if v, ok := strings.CutPrefix(o, "pagesize="); ok {
					if n, err := size.Parse(v); err == nil {
						m.PageSize = n
					}
				}
			}
		}
		m.Writable = unix.Access(m.Path, unix.W_OK) == nil
		out = append(out, m)
	}
	return out
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}
