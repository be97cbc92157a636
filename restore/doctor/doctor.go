// Package doctor turns a uffd.Report (what the kernel, the permission model
// and the huge page pools allow this user) into a checklist: one line per
// item, the exact command that fixes each failing one, and which restore
// backings (hugetlbfs, memfd-hugetlb, shmem) will work.
//
// Check is a pure function of the report, so every verdict can be tested
// with a fabricated report; only uffd.Probe touches the system.
package doctor

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// Status is the verdict on one item.
type Status string

// Verdicts, from best to worst. Only a Fail on a backing decides the exit
// code; Fail on another item explains why a backing is unusable.
const (
	OK   Status = "ok"
	Info Status = "info"
	Warn Status = "warn"
	Fail Status = "fail"
)

// Item is one line of the checklist.
type Item struct {
	Section string   `json:"section"`
	Name    string   `json:"name"`
	Status  Status   `json:"status"`
	Detail  string   `json:"detail"`
	Fix     []string `json:"fix,omitempty"` // commands or steps, best first
}

// Backing says whether one kind of backing file can be restored into lazily.
type Backing struct {
	Name     string   `json:"name"` // "hugetlbfs", "memfd-hugetlb", "shmem"
	PageSize int64    `json:"page_size"`
	Usable   bool     `json:"usable"`
	Detail   string   `json:"detail"`
	Limits   string   `json:"limits,omitempty"` // what works differently for this user
	Fix      []string `json:"fix,omitempty"`
}

// Functional is the outcome of the probe's real MINOR registrations.
type Functional struct {
	Userfaultfd       string `json:"userfaultfd"`         // "ok" or the error
	MinorHugetlbMemfd string `json:"minor_hugetlb_memfd"` // "ok" or the error
	MinorShmemMemfd   string `json:"minor_shmem_memfd"`   // "ok" or the error
}

// Result is the doctor's verdict.
type Result struct {
	Report     *uffd.Report `json:"report"`
	Functional Functional   `json:"functional"`
	Items      []Item       `json:"checks"`
	Backings   []Backing    `json:"backings"`
	OK         bool         `json:"ok"` // at least one backing is usable
	Summary    string       `json:"summary"`
}

// ExitCode is 0 when at least one lazy-restore backing works, 1 otherwise.
func (r Result) ExitCode() int {
	if r.OK {
		return 0
	}
	return 1
}

// Backing returns the named backing (zero value if unknown).
func (r Result) Backing(name string) Backing {
	for _, b := range r.Backings {
		if b.Name == name {
			return b
		}
	}
	return Backing{}
}

// Minimum kernels, from the userfaultfd feature history.
const (
	minLinuxHugetlbfs = "5.13" // UFFD_FEATURE_MINOR_HUGETLBFS
	minLinuxShmem     = "5.14" // UFFD_FEATURE_MINOR_SHMEM
	minLinuxPoison    = "6.6"  // UFFDIO_POISON
	minLinuxDev       = "6.1"  // /dev/userfaultfd
)

// Backing names.
const (
	BackingHugetlbfs    = "hugetlbfs"
	BackingMemfdHugetlb = "memfd-hugetlb"
	BackingShmem        = "shmem"
)

const sysctlWarning = "not recommended: it lets every unprivileged process hold the kernel on a page fault in its own memory, the classic way to widen race windows in kernel exploits; grant /dev/userfaultfd to the users who need it instead"

type checker struct {
	r   *uffd.Report
	res Result
}

// Check judges a report. It does not touch the system.
func Check(r *uffd.Report) Result {
	if r == nil {
		r = &uffd.Report{}
	}
	c := &checker{r: r}
	c.res.Report = r
	c.res.Functional = Functional{
		Userfaultfd:       errString(r.UffdErr),
		MinorHugetlbMemfd: errString(r.MinorHugetlbMemfd),
		MinorShmemMemfd:   errString(r.MinorShmemMemfd),
	}
	c.kernel()
	c.userfaultfd()
	c.features()
	c.hugePools()
	c.mounts()
	c.backings()
	c.summary()
	return c.res
}

func errString(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

func (c *checker) add(it Item) { c.res.Items = append(c.res.Items, it) }

// kernelAtLeast compares the report's kernel with "X.Y".
func (c *checker) kernelAtLeast(v string) bool {
	maj, min := parseVersion(v)
	if c.r.KernelMajor != maj {
		return c.r.KernelMajor > maj
	}
	return c.r.KernelMinor >= min
}

func parseVersion(v string) (int, int) {
	a, b, _ := strings.Cut(v, ".")
	maj, _ := strconv.Atoi(a)
	min, _ := strconv.Atoi(b)
	return maj, min
}

func (c *checker) hasFeature(bit uffd.Features, name string) bool {
	if c.r.UffdErr != nil {
		return false
	}
	return (bit != 0 && c.r.FeatureOK(bit)) || c.r.Features[name]
}

func (c *checker) kernel() {
	it := Item{Section: "kernel", Name: "kernel version"}
	switch {
	case c.r.KernelMajor == 0:
		it.Status, it.Detail = Warn, "kernel version unknown (uname failed)"
	case !c.kernelAtLeast(minLinuxHugetlbfs):
		it.Status = Fail
		it.Detail = fmt.Sprintf("Linux %s has no userfaultfd minor faults (hugetlbfs needs >= %s, shmem >= %s)", c.r.Kernel, minLinuxHugetlbfs, minLinuxShmem)
		it.Fix = []string{fmt.Sprintf("upgrade to Linux >= %s (>= %s for UFFDIO_POISON)", minLinuxShmem, minLinuxPoison)}
	case !c.kernelAtLeast(minLinuxShmem):
		it.Status = Warn
		it.Detail = fmt.Sprintf("Linux %s: minor faults on hugetlbfs only; shmem needs >= %s", c.r.Kernel, minLinuxShmem)
		it.Fix = []string{fmt.Sprintf("upgrade to Linux >= %s for the shmem backing (>= %s for UFFDIO_POISON)", minLinuxShmem, minLinuxPoison)}
	case !c.kernelAtLeast(minLinuxPoison):
		it.Status = Warn
		it.Detail = fmt.Sprintf("Linux %s: minor faults on hugetlbfs and shmem; no UFFDIO_POISON (>= %s)", c.r.Kernel, minLinuxPoison)
		it.Fix = []string{fmt.Sprintf("upgrade to Linux >= %s so a chunk failing its checksum during a lazy fill is poisoned (SIGBUS) instead of failing the restore", minLinuxPoison)}
	default:
		it.Status = OK
		it.Detail = fmt.Sprintf("Linux %s (minor faults: hugetlbfs >= %s, shmem >= %s; UFFDIO_POISON >= %s)", c.r.Kernel, minLinuxHugetlbfs, minLinuxShmem, minLinuxPoison)
	}
	c.add(it)
}

// userName is how fixes name this user.
func (c *checker) userName() string {
	if c.r.Permission.User != "" {
		return c.r.Permission.User
	}
	if c.r.Permission.EUID == 0 {
		return "root"
	}
	return "USER"
}

// devFixes are the ways to grant this user full userfaultfd access.
func (c *checker) devFixes() []string {
	u := c.userName()
	p := c.r.Permission
	if !p.DevPresent && !c.kernelAtLeast(minLinuxDev) {
		return []string{
			fmt.Sprintf("run as root or with CAP_SYS_PTRACE (e.g. setcap cap_sys_ptrace+ep $(command -v uffdrestore)); /dev/userfaultfd needs Linux >= %s", minLinuxDev),
			"sysctl vm.unprivileged_userfaultfd=1   # " + sysctlWarning,
		}
	}
	fixes := []string{
		fmt.Sprintf("groupadd -f uffd && chgrp uffd /dev/userfaultfd && chmod 0660 /dev/userfaultfd && usermod -aG uffd %s   # as root; log in again; persist with the udev rule KERNEL==\"userfaultfd\", GROUP=\"uffd\", MODE=\"0660\" in /etc/udev/rules.d/99-userfaultfd.rules", u),
		fmt.Sprintf("setfacl -m u:%s:rw /dev/userfaultfd   # as root; lost at reboot", u),
	}
	if !p.DevPresent {
		fixes = append([]string{"mknod -m 0660 /dev/userfaultfd c 10 $(awk '$2==\"userfaultfd\"{print $1}' /proc/misc)   # as root: the device is missing"}, fixes...)
	}
	return append(fixes, "sysctl vm.unprivileged_userfaultfd=1   # "+sysctlWarning)
}

// userModeOnly reports whether this user gets only UFFD_USER_MODE_ONLY.
func (c *checker) userModeOnly() bool {
	p := c.r.Permission
	return !p.SyscallFull && !p.DevAccessible && p.SyscallUserModeOnly
}

const userModeLimits = "UFFD_USER_MODE_ONLY: only faults raised in user mode are handled; a kernel access to an unfilled page (read(2)/write(2) with the buffer there, a pipe or socket copy) fails with EFAULT instead of waiting, so the target must touch pages itself first, or restore eagerly"

func (c *checker) userfaultfd() {
	p := c.r.Permission
	sysctl := "unknown"
	if p.UnprivilegedSysctl >= 0 {
		sysctl = strconv.Itoa(p.UnprivilegedSysctl)
	}
	dev := "absent"
	if p.DevPresent {
		dev = p.DevMode
		if p.DevAccessible {
			dev += " (read/write for this user)"
		} else {
			dev += " (no access for this user)"
		}
	}
	who := fmt.Sprintf("euid %d", p.EUID)
	if p.User != "" {
		who += " (" + p.User + ")"
	}
	model := fmt.Sprintf("%s, CAP_SYS_PTRACE %s, vm.unprivileged_userfaultfd=%s, /dev/userfaultfd %s", who, yesNo(p.CapSysPtrace), sysctl, dev)
	c.add(Item{Section: "userfaultfd", Name: "permission model", Status: Info, Detail: model})

	it := Item{Section: "userfaultfd", Name: "userfaultfd access"}
	switch {
	case errors.Is(c.r.UffdErr, unix.ENOSYS):
		it.Status = Fail
		it.Detail = "userfaultfd(2) is not implemented: " + c.r.UffdErr.Error()
		it.Fix = []string{"use a kernel built with CONFIG_USERFAULTFD=y (Debian's is)", fmt.Sprintf("upgrade to Linux >= %s", minLinuxShmem)}
	case p.SyscallFull:
		it.Status = OK
		why := "vm.unprivileged_userfaultfd=1"
		if p.EUID == 0 || p.CapSysPtrace {
			why = "root / CAP_SYS_PTRACE"
		}
		it.Detail = "userfaultfd(2) with kernel-mode faults (" + why + "): a read(2) into an unfilled page waits for the fill"
	case p.DevAccessible && c.r.UffdErr == nil:
		it.Status = OK
		it.Detail = "/dev/userfaultfd is accessible: kernel-mode faults are handled (a read(2) into an unfilled page waits for the fill)"
	case c.userModeOnly() && c.r.UffdErr == nil:
		it.Status = Warn
		it.Detail = "userfaultfd(2) works only with " + userModeLimits
		it.Fix = c.devFixes()
	default:
		it.Status = Fail
		it.Detail = "userfaultfd is not permitted for this user"
		if p.SyscallErr != "" {
			it.Detail += ": " + p.SyscallErr
		}
		if c.r.UffdErr != nil && c.r.UffdErr.Error() != p.SyscallErr {
			it.Detail += "; " + c.r.UffdErr.Error()
		}
		it.Fix = c.devFixes()
	}
	c.add(it)

	// As root, say what an ordinary user of this machine would get, since
	// root's view hides it.
	if p.EUID == 0 && p.UnprivilegedSysctl == 0 && (!p.DevPresent || !groupOrOtherRW(p.DevMode)) {
		dev := "absent"
		if p.DevPresent {
			dev = p.DevMode
		}
		c.add(Item{Section: "userfaultfd", Name: "other users", Status: Info,
			Detail: "non-root users get only UFFD_USER_MODE_ONLY here unless an ACL grants more (vm.unprivileged_userfaultfd=0, /dev/userfaultfd " + dev + "); see README, \"Non-root users\"",
			Fix:    []string{"groupadd -f uffd && chgrp uffd /dev/userfaultfd && chmod 0660 /dev/userfaultfd && usermod -aG uffd USER   # grants USER full access"}})
	}
}

// groupOrOtherRW reports whether a mode string such as "Dcrw-rw----" gives
// its group or everyone read and write access.
func groupOrOtherRW(mode string) bool {
	if len(mode) < 6 {
		return false
	}
	perm := mode[len(mode)-6:]
	return perm[:2] == "rw" || perm[3:5] == "rw"
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// featureList is what the doctor reports, in order. Required features
// decide backings; the others are warnings.
var featureList = []struct {
	bit      func() uffd.Features
	name     string
	minLinux string
	status   Status // verdict when missing
	missing  string // what is lost when missing
}{
	{func() uffd.Features { return uffd.FeatureMinorHugetlbfs }, "minor faults on hugetlbfs", minLinuxHugetlbfs, Fail, "no lazy restore on hugetlbfs / memfd-hugetlb backings"},
	{func() uffd.Features { return uffd.FeatureMinorShmem }, "minor faults on shmem", minLinuxShmem, Fail, "no lazy restore on the shmem backing"},
	{func() uffd.Features { return uffd.FeaturePoison }, "UFFDIO_POISON", minLinuxPoison, Warn, "a chunk that fails its checksum during a lazy fill cannot be poisoned; the restore fails instead"},
	{func() uffd.Features { return uffd.FeatureMissingHugetlbfs }, "missing faults on hugetlbfs", "4.11", Warn, "hugetlb views must be fully allocated before they are registered"},
	{func() uffd.Features { return uffd.FeatureMissingShmem }, "missing faults on shmem", "4.11", Warn, "shmem views must be fully allocated before they are registered"},
	{func() uffd.Features { return uffd.FeatureEventFork }, "fork events", "4.11", Warn, "a target that forks is not followed"},
	{func() uffd.Features { return uffd.FeatureEventRemap }, "mremap events", "4.11", Warn, "a target that mremaps a view is not followed"},
	{func() uffd.Features { return uffd.FeatureEventRemove }, "remove (MADV_REMOVE/DONTNEED) events", "4.11", Warn, "pages a target discards are not noticed"},
	{func() uffd.Features { return uffd.FeatureEventUnmap }, "unmap events", "4.11", Warn, "a target that unmaps a view is not noticed"},
	{func() uffd.Features { return uffd.FeatureWPHugetlbfsShmem }, "write-protect on hugetlbfs/shmem", "5.19", Info, "no write tracking on views"},
}

func (c *checker) features() {
	for _, f := range featureList {
		it := Item{Section: "features", Name: f.name}
		switch {
		case c.r.UffdErr != nil:
			it.Status, it.Detail = Warn, "unknown: userfaultfd could not be opened"
		case c.hasFeature(f.bit(), f.name) && f.bit() == uffd.FeatureEventFork && !c.r.Permission.CapSysPtrace:
			// UFFDIO_API refuses EVENT_FORK without CAP_SYS_PTRACE.
			it.Status = Info
			it.Detail = "in the kernel, but not for " + c.userName() + ": it needs CAP_SYS_PTRACE. " +
				"A target's forked child gets no mapping of the restored regions (the clients mark them " +
				"MADV_DONTFORK: a touch there is SIGSEGV, not zeros); fork+exec is unaffected"
		case c.hasFeature(f.bit(), f.name):
			it.Status, it.Detail = OK, "available (Linux >= "+f.minLinux+")"
		default:
			it.Status, it.Detail = f.status, "missing: "+f.missing
			it.Fix = []string{"upgrade to Linux >= " + f.minLinux}
		}
		c.add(it)
	}
}

// hugeFix is the command that reserves n default-size huge pages.
func hugeFix(n int64) string {
	return fmt.Sprintf("echo %d > /proc/sys/vm/nr_hugepages   # as root; or: sysctl vm.nr_hugepages=%d; persist in /etc/sysctl.d/80-hugepages.conf; or: make hugepages HUGEPAGES=%d", n, n, n)
}

// suggestedPages is how many default-size pages to ask for: 1 GiB more
// than now, at least 1 GiB.
func suggestedPages(p uffd.HugePool) int64 {
	size := p.PageSize
	if size <= 0 {
		size = 2 << 20
	}
	n := int64(1<<30) / size
	if n < 1 {
		n = 1
	}
	return p.Total + n
}

func (c *checker) hugePools() {
	def := c.r.DefaultHugePool()
	if len(c.r.HugePools) == 0 {
		c.add(Item{Section: "huge pages", Name: "huge page pools", Status: Fail,
			Detail: "no pools under /sys/kernel/mm/hugepages: this kernel has no hugetlb support (CONFIG_HUGETLBFS)",
			Fix:    []string{"use a kernel with CONFIG_HUGETLBFS=y, or restore on the shmem backing"}})
		return
	}
	for _, p := range c.r.HugePools {
		it := Item{Section: "huge pages", Name: sizeName(p.PageSize) + " pool",
			Detail: fmt.Sprintf("%d total, %d free, %d reserved, %d surplus (%d available)", p.Total, p.Free, p.Reserved, p.Surplus, p.Available())}
		switch {
		case p.PageSize != def.PageSize:
			it.Status = Info
			if p.Available() <= 0 {
				it.Detail += "; not the default size, not used by default"
			}
		case p.Available() > 0:
			it.Status = OK
		default:
			it.Status = Fail
			if p.Total == 0 {
				it.Detail += ": no huge pages reserved, so hugetlbfs and memfd-hugetlb backings cannot be used"
			} else {
				it.Detail += ": every huge page is in use or reserved"
			}
			it.Fix = []string{hugeFix(suggestedPages(p))}
		}
		c.add(it)
	}
}

func sizeName(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// mountOpt is the pagesize= mount option for size n.
func mountOpt(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%dG", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dM", n>>20)
	}
	return fmt.Sprintf("%dK", n>>10)
}

// usableMount returns a writable hugetlbfs mount of the default page size.
func (c *checker) usableMount() (uffd.HugetlbfsMount, bool) {
	def := c.r.DefaultHugePool().PageSize
	for _, m := range c.r.Mounts {
		if m.PageSize == def && m.Writable {
			return m, true
		}
	}
	return uffd.HugetlbfsMount{}, false
}

func (c *checker) mountFixes() []string {
	def := c.r.DefaultHugePool().PageSize
	p := c.r.Permission
	var readOnly []string
	for _, m := range c.r.Mounts {
		if m.PageSize == def && !m.Writable {
			readOnly = append(readOnly, m.Path)
		}
	}
	if len(readOnly) > 0 {
		u := c.userName()
		return []string{
			fmt.Sprintf("chown %s %s   # as root; or give a group write access: chgrp GROUP %s && chmod 1770 %s", u, readOnly[0], readOnly[0], readOnly[0]),
			fmt.Sprintf("mkdir -p /run/uffdrestore-%s && mount -t hugetlbfs -o pagesize=%s,uid=%d,mode=0700 none /run/uffdrestore-%s   # as root: a private mount", u, mountOpt(def), p.EUID, u),
		}
	}
	opts := "pagesize=" + mountOpt(def)
	if p.EUID != 0 {
		opts += fmt.Sprintf(",uid=%d,mode=0700", p.EUID)
	}
	return []string{fmt.Sprintf("mkdir -p /dev/hugepages && mount -t hugetlbfs -o %s none /dev/hugepages   # as root; persist with an fstab line: none /dev/hugepages hugetlbfs %s 0 0", opts, opts)}
}

func (c *checker) mounts() {
	def := c.r.DefaultHugePool().PageSize
	if len(c.r.Mounts) == 0 {
		c.add(Item{Section: "hugetlbfs mounts", Name: "hugetlbfs mount", Status: Fail,
			Detail: "no hugetlbfs mounted: the hugetlbfs backing needs one (memfd-hugetlb does not)",
			Fix:    c.mountFixes()})
		return
	}
	for _, m := range c.r.Mounts {
		it := Item{Section: "hugetlbfs mounts", Name: m.Path, Detail: fmt.Sprintf("pagesize %s, ", sizeName(m.PageSize))}
		switch {
		case !m.Writable:
			it.Status = Warn
			it.Detail += "not writable by this user"
		case m.PageSize != def:
			it.Status = Info
			it.Detail += "writable, not the default huge page size"
		default:
			it.Status = OK
			it.Detail += "writable"
		}
		c.add(it)
	}
	if _, ok := c.usableMount(); !ok {
		c.add(Item{Section: "hugetlbfs mounts", Name: "usable mount", Status: Fail,
			Detail: fmt.Sprintf("no writable hugetlbfs mount with %s pages for this user", sizeName(def)),
			Fix:    c.mountFixes()})
	}
}

func (c *checker) backings() {
	def := c.r.DefaultHugePool()
	uffdFix := func() []string {
		if c.r.UffdErr != nil {
			return c.devFixes()
		}
		return nil
	}
	var limits string
	if c.userModeOnly() {
		limits = userModeLimits
	}
	hugeOK := c.hasFeature(uffd.FeatureMinorHugetlbfs, "minor faults on hugetlbfs")
	pagesOK := def.Available() > 0

	// Both huge-page backings need userfaultfd, minor faults on hugetlbfs
	// and free huge pages: why b lacks them, with the fixes added to b.
	hugeNeeds := func(b *Backing) []string {
		var why []string
		switch {
		case c.r.UffdErr != nil:
			why = append(why, "userfaultfd not available")
			b.Fix = append(b.Fix, uffdFix()...)
		case !hugeOK:
			why = append(why, "no minor faults on hugetlbfs (Linux >= "+minLinuxHugetlbfs+")")
			b.Fix = append(b.Fix, "upgrade to Linux >= "+minLinuxHugetlbfs)
		}
		if !pagesOK {
			why = append(why, fmt.Sprintf("no free %s huge pages", sizeName(def.PageSize)))
			b.Fix = append(b.Fix, hugeFix(suggestedPages(def)))
		}
		return why
	}
	// memfd-hugetlb: free huge pages + MINOR_HUGETLBFS.
	mh := Backing{Name: BackingMemfdHugetlb, PageSize: def.PageSize, Limits: limits}
	why := hugeNeeds(&mh)
	if len(why) == 0 && c.r.MinorHugetlbMemfd != nil {
		why = append(why, "registering a hugetlb memfd view failed: "+c.r.MinorHugetlbMemfd.Error())
	}
	mh.Usable = len(why) == 0
	if mh.Usable {
		mh.Detail = fmt.Sprintf("%s pages, %d available (%s)", sizeName(def.PageSize), def.Available(), sizeName(def.Available()*def.PageSize))
	} else {
		mh.Detail = strings.Join(why, "; ")
	}

	// hugetlbfs: the same plus a writable mount.
	hf := Backing{Name: BackingHugetlbfs, PageSize: def.PageSize, Limits: limits}
	why = hugeNeeds(&hf)
	m, mountOK := c.usableMount()
	if !mountOK {
		why = append(why, fmt.Sprintf("no writable hugetlbfs mount with %s pages", sizeName(def.PageSize)))
		hf.Fix = append(hf.Fix, c.mountFixes()...)
	}
	if len(why) == 0 && c.r.MinorHugetlbMemfd != nil {
		why = append(why, "registering a hugetlb view failed: "+c.r.MinorHugetlbMemfd.Error())
	}
	hf.Usable = len(why) == 0
	if hf.Usable {
		hf.Detail = fmt.Sprintf("%s pages in %s, %d available (files in a mount cannot be sealed against shrinking)", sizeName(def.PageSize), m.Path, def.Available())
	} else {
		hf.Detail = strings.Join(why, "; ")
	}

	// shmem: MINOR_SHMEM.
	sh := Backing{Name: BackingShmem, PageSize: 4096, Limits: limits}
	why = nil
	switch {
	case c.r.UffdErr != nil:
		why = append(why, "userfaultfd not available")
		sh.Fix = append(sh.Fix, uffdFix()...)
	case !c.hasFeature(uffd.FeatureMinorShmem, "minor faults on shmem"):
		why = append(why, "no minor faults on shmem (Linux >= "+minLinuxShmem+")")
		sh.Fix = append(sh.Fix, "upgrade to Linux >= "+minLinuxShmem)
	case c.r.MinorShmemMemfd != nil:
		why = append(why, "registering a shmem memfd view failed: "+c.r.MinorShmemMemfd.Error())
	}
	sh.Usable = len(why) == 0
	if sh.Usable {
		sh.Detail = "4 KiB pages, no reservation needed (a fault per 4 KiB page costs more than per 2 MiB page: resolve whole chunks)"
	} else {
		sh.Detail = strings.Join(why, "; ")
	}

	c.res.Backings = []Backing{hf, mh, sh}
}

func (c *checker) summary() {
	var ok []string
	for _, b := range c.res.Backings {
		if b.Usable {
			ok = append(ok, b.Name)
		}
	}
	c.res.OK = len(ok) > 0
	who := c.userName()
	if c.res.OK {
		c.res.Summary = fmt.Sprintf("doctor: %d of %d restore backings usable for %s: %s", len(ok), len(c.res.Backings), who, strings.Join(ok, ", "))
		return
	}
	c.res.Summary = fmt.Sprintf("doctor: no lazy-restore backing works for %s; apply a fix marked FAIL above", who)
}

func mark(s Status) string {
	switch s {
	case OK:
		return "[ OK ]"
	case Warn:
		return "[WARN]"
	case Fail:
		return "[FAIL]"
	}
	return "[INFO]"
}

// WriteText prints the checklist for a human.
func (r Result) WriteText(w io.Writer) error {
	ew := &errWriter{w: w}
	kernel := "unknown"
	if r.Report != nil && r.Report.Kernel != "" {
		kernel = r.Report.Kernel
	}
	ew.printf("uffdrestore doctor: Linux %s\n", kernel)
	section := ""
	for _, it := range r.Items {
		if it.Section != section {
			section = it.Section
			ew.printf("\n%s:\n", section)
		}
		ew.printf("  %s %s: %s\n", mark(it.Status), it.Name, it.Detail)
		if it.Status == Warn || it.Status == Fail || it.Status == Info {
			for _, f := range it.Fix {
				ew.printf("         fix: %s\n", f)
			}
		}
	}
	ew.printf("\nrestore backings:\n")
	for _, b := range r.Backings {
		st := OK
		if !b.Usable {
			st = Fail
		}
		ew.printf("  %s %s: %s\n", mark(st), b.Name, b.Detail)
		if b.Usable && b.Limits != "" {
			ew.printf("         limits: %s\n", b.Limits)
		}
		if !b.Usable {
			for _, f := range b.Fix {
				ew.printf("         fix: %s\n", f)
			}
		}
	}
	ew.printf("\n%s\n", r.Summary)
	return ew.err
}

type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) printf(format string, args ...any) {
	if e.err == nil {
		_, e.err = fmt.Fprintf(e.w, format, args...)
	}
}
