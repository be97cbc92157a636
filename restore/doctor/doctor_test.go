package doctor

import (
	"bytes"
	"encoding/json"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
)

func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }

const mib2 = 2 << 20

func allFeatures() uffd.Features {
	return uffd.FeatureMinorHugetlbfs | uffd.FeatureMinorShmem | uffd.FeaturePoison |
		uffd.FeatureMissingHugetlbfs | uffd.FeatureMissingShmem | uffd.FeatureEventFork |
		uffd.FeatureEventRemap | uffd.FeatureEventRemove | uffd.FeatureEventUnmap |
		uffd.FeatureWPHugetlbfsShmem
}

// healthy is a root on Linux 6.18 with 512 free 2 MiB pages and a writable
// hugetlbfs mount: everything works.
func healthy() *uffd.Report {
	return &uffd.Report{
		Kernel: "6.18.0", KernelMajor: 6, KernelMinor: 18,
		FeatureBits: uint64(allFeatures()),
		Permission: uffd.Permission{EUID: 0, User: "root", CapSysPtrace: true, UnprivilegedSysctl: 0,
			DevPresent: true, DevMode: "Dcrw-------", DevAccessible: true, SyscallFull: true, SyscallUserModeOnly: true},
		HugePools: []uffd.HugePool{{PageSize: mib2, Total: 512, Free: 512}, {PageSize: 1 << 30}},
		Mounts:    []uffd.HugetlbfsMount{{Path: "/dev/hugepages", PageSize: mib2, Writable: true}},
	}
}

func fixes(res Result) string {
	var b strings.Builder
	for _, it := range res.Items {
		for _, f := range it.Fix {
			b.WriteString(f + "\n")
		}
	}
	for _, bk := range res.Backings {
		for _, f := range bk.Fix {
			b.WriteString(f + "\n")
		}
	}
	return b.String()
}

func text(t *testing.T, res Result) string {
	t.Helper()
	var b bytes.Buffer
	if err := res.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func wantUsable(t *testing.T, res Result, want map[string]bool) {
	t.Helper()
	for name, usable := range want {
		b := res.Backing(name)
		if b.Name != name {
			t.Errorf("backing %s missing from %+v", name, res.Backings)
			continue
		}
		if b.Usable != usable {
			t.Errorf("backing %s usable = %v, want %v (%s)", name, b.Usable, usable, b.Detail)
		}
	}
}

func TestHealthy(t *testing.T) {
	res := Check(healthy())
	if !res.OK || res.ExitCode() != 0 {
		t.Fatalf("healthy report: OK=%v exit=%d: %s", res.OK, res.ExitCode(), res.Summary)
	}
	wantUsable(t, res, map[string]bool{BackingHugetlbfs: true, BackingMemfdHugetlb: true, BackingShmem: true})
	for _, it := range res.Items {
		if it.Status == Fail || it.Status == Warn {
			t.Errorf("healthy report has %s item %q: %s", it.Status, it.Name, it.Detail)
		}
	}
	out := text(t, res)
	if !strings.Contains(out, "3 of 3 restore backings usable for root") {
		t.Errorf("summary missing:\n%s", out)
	}
}

func TestNoHugePages(t *testing.T) {
	r := healthy()
	r.HugePools[0] = uffd.HugePool{PageSize: mib2}
	r.MinorHugetlbMemfd = os.NewSyscallError("mmap", unix.ENOMEM)
	res := Check(r)
	if !res.OK || res.ExitCode() != 0 {
		t.Fatalf("shmem still works, want exit 0: %s", res.Summary)
	}
	wantUsable(t, res, map[string]bool{BackingHugetlbfs: false, BackingMemfdHugetlb: false, BackingShmem: true})
	f := fixes(res)
	if !strings.Contains(f, "> /proc/sys/vm/nr_hugepages") || !strings.Contains(f, "sysctl vm.nr_hugepages=") {
		t.Errorf("fixes do not name nr_hugepages:\n%s", f)
	}
	if d := res.Backing(BackingMemfdHugetlb).Detail; !strings.Contains(d, "no free 2 MiB huge pages") {
		t.Errorf("memfd-hugetlb detail = %q", d)
	}
	out := text(t, res)
	if !strings.Contains(out, "[FAIL] memfd-hugetlb") || !strings.Contains(out, "[ OK ] shmem") {
		t.Errorf("text output:\n%s", out)
	}
}

func TestHugePagesAllInUse(t *testing.T) {
	r := healthy()
	r.HugePools[0] = uffd.HugePool{PageSize: mib2, Total: 100, Free: 10, Reserved: 10}
	res := Check(r)
	wantUsable(t, res, map[string]bool{BackingMemfdHugetlb: false, BackingShmem: true})
	// 1 GiB more than the current pool.
	if f := fixes(res); !strings.Contains(f, "echo 612 > /proc/sys/vm/nr_hugepages") {
		t.Errorf("fix should grow the pool to 612:\n%s", f)
	}
}

func TestNoMount(t *testing.T) {
	r := healthy()
	r.Mounts = nil
	res := Check(r)
	wantUsable(t, res, map[string]bool{BackingHugetlbfs: false, BackingMemfdHugetlb: true, BackingShmem: true})
	if f := strings.Join(res.Backing(BackingHugetlbfs).Fix, "\n"); !strings.Contains(f, "mount -t hugetlbfs -o pagesize=2M none /dev/hugepages") {
		t.Errorf("hugetlbfs fix = %q", f)
	}
}

func TestMountNotWritable(t *testing.T) {
	r := healthy()
	r.Permission = uffd.Permission{EUID: 1000, User: "alice", UnprivilegedSysctl: 0, DevPresent: true,
		DevMode: "Dcrw-rw----", DevAccessible: true, SyscallUserModeOnly: true}
	r.Mounts[0].Writable = false
	res := Check(r)
	wantUsable(t, res, map[string]bool{BackingHugetlbfs: false, BackingMemfdHugetlb: true})
	if f := strings.Join(res.Backing(BackingHugetlbfs).Fix, "\n"); !strings.Contains(f, "chown alice /dev/hugepages") {
		t.Errorf("hugetlbfs fix = %q", f)
	}
	if b := res.Backing(BackingShmem); b.Limits != "" {
		t.Errorf("/dev/userfaultfd access gives full fault handling, got limits %q", b.Limits)
	}
}

// A user with no userfaultfd at all (e.g. UFFD_USER_MODE_ONLY refused too).
func TestNoPermission(t *testing.T) {
	r := healthy()
	eperm := os.NewSyscallError("userfaultfd", unix.EPERM)
	r.Permission = uffd.Permission{EUID: 1000, User: "alice", UnprivilegedSysctl: 0, DevPresent: true,
		DevMode: "Dcrw-------", SyscallErr: eperm.Error()}
	r.UffdErr = os.NewSyscallError("open /dev/userfaultfd", unix.EACCES)
	r.MinorHugetlbMemfd, r.MinorShmemMemfd = r.UffdErr, r.UffdErr
	r.FeatureBits = 0
	res := Check(r)
	if res.OK || res.ExitCode() != 1 {
		t.Fatalf("no userfaultfd: want exit 1, got OK=%v: %s", res.OK, res.Summary)
	}
	wantUsable(t, res, map[string]bool{BackingHugetlbfs: false, BackingMemfdHugetlb: false, BackingShmem: false})
	f := fixes(res)
	for _, want := range []string{"chmod 0660 /dev/userfaultfd", "chgrp uffd /dev/userfaultfd", "setfacl -m u:alice:rw /dev/userfaultfd", "sysctl vm.unprivileged_userfaultfd=1", "not recommended"} {
		if !strings.Contains(f, want) {
			t.Errorf("fixes lack %q:\n%s", want, f)
		}
	}
	if !strings.Contains(res.Summary, "no lazy-restore backing works for alice") {
		t.Errorf("summary = %q", res.Summary)
	}
}

// The Debian default for a non-root user: only UFFD_USER_MODE_ONLY.
func TestUserModeOnly(t *testing.T) {
	r := healthy()
	r.Permission = uffd.Permission{EUID: 65534, User: "nobody", UnprivilegedSysctl: 0, DevPresent: true,
		DevMode: "Dcrw-------", SyscallUserModeOnly: true, SyscallErr: "userfaultfd: operation not permitted"}
	res := Check(r)
	if !res.OK {
		t.Fatalf("user-mode-only shmem works: %s", res.Summary)
	}
	wantUsable(t, res, map[string]bool{BackingShmem: true, BackingMemfdHugetlb: true})
	sh := res.Backing(BackingShmem)
	if !strings.Contains(sh.Limits, "UFFD_USER_MODE_ONLY") || !strings.Contains(sh.Limits, "EFAULT") {
		t.Errorf("shmem limits = %q, want the EFAULT limitation", sh.Limits)
	}
	if f := fixes(res); !strings.Contains(f, "/dev/userfaultfd") || !strings.Contains(f, "setfacl -m u:nobody:rw") {
		t.Errorf("fixes lack the /dev/userfaultfd grant:\n%s", f)
	}
	out := text(t, res)
	if !strings.Contains(out, "[WARN] userfaultfd access") || !strings.Contains(out, "limits: UFFD_USER_MODE_ONLY") {
		t.Errorf("text output:\n%s", out)
	}
	// The kernel has fork events, but UFFDIO_API grants them only with
	// CAP_SYS_PTRACE: the doctor must not call them available to nobody.
	if it := item(t, res, "fork events"); it.Status != Info || !strings.Contains(it.Detail, "CAP_SYS_PTRACE") || !strings.Contains(it.Detail, "forked child") {
		t.Errorf("fork events for nobody: %v %q", it.Status, it.Detail)
	}
	if it := item(t, Check(healthy()), "fork events"); it.Status != OK {
		t.Errorf("fork events for root: %v %q", it.Status, it.Detail)
	}
}

func item(t *testing.T, res Result, name string) Item {
	t.Helper()
	for _, it := range res.Items {
		if it.Name == name {
			return it
		}
	}
	t.Fatalf("no %q item", name)
	return Item{}
}

func TestOldKernel(t *testing.T) {
	for _, tc := range []struct {
		major, minor int
		feat         uffd.Features
		want         string
		ok           bool
		usable       map[string]bool
	}{
		{5, 10, uffd.FeatureMissingHugetlbfs | uffd.FeatureMissingShmem, "upgrade to Linux >= 5.14", false,
			map[string]bool{BackingHugetlbfs: false, BackingMemfdHugetlb: false, BackingShmem: false}},
		{5, 13, uffd.FeatureMinorHugetlbfs, "upgrade to Linux >= 5.14", true,
			map[string]bool{BackingHugetlbfs: true, BackingMemfdHugetlb: true, BackingShmem: false}},
		{6, 1, uffd.FeatureMinorHugetlbfs | uffd.FeatureMinorShmem, "upgrade to Linux >= 6.6", true,
			map[string]bool{BackingHugetlbfs: true, BackingMemfdHugetlb: true, BackingShmem: true}},
	} {
		r := healthy()
		r.KernelMajor, r.KernelMinor = tc.major, tc.minor
		r.Kernel = strconv.Itoa(tc.major) + "." + strconv.Itoa(tc.minor) + ".0"
		r.FeatureBits = uint64(tc.feat)
		if tc.feat&uffd.FeatureMinorShmem == 0 {
			r.MinorShmemMemfd = &uffd.NotSupportedError{Feature: "minor faults on shmem", MinLinux: "5.14"}
		}
		if tc.feat&uffd.FeatureMinorHugetlbfs == 0 {
			r.MinorHugetlbMemfd = &uffd.NotSupportedError{Feature: "minor faults on hugetlbfs", MinLinux: "5.13"}
		}
		res := Check(r)
		if res.OK != tc.ok {
			t.Errorf("Linux %s: OK = %v, want %v (%s)", r.Kernel, res.OK, tc.ok, res.Summary)
		}
		wantUsable(t, res, tc.usable)
		if f := fixes(res); !strings.Contains(f, tc.want) {
			t.Errorf("Linux %s: fixes lack %q:\n%s", r.Kernel, tc.want, f)
		}
	}
}

func TestNoUserfaultfdInKernel(t *testing.T) {
	r := healthy()
	r.UffdErr = os.NewSyscallError("userfaultfd", unix.ENOSYS)
	r.FeatureBits = 0
	res := Check(r)
	if res.OK {
		t.Fatal("no userfaultfd: want not OK")
	}
	if f := fixes(res); !strings.Contains(f, "CONFIG_USERFAULTFD") {
		t.Errorf("fixes lack CONFIG_USERFAULTFD:\n%s", f)
	}
}

// TestUffdErrByErrno: doctor judges userfaultfd(2)'s failure by its errno,
// not by its text: an EPERM whose message happens to say "function not
// implemented" (a seccomp profile's note) is a permission problem, not a
// kernel without userfaultfd.
func TestUffdErrByErrno(t *testing.T) {
	r := healthy()
	r.UffdErr = &os.PathError{Op: "userfaultfd (seccomp: function not implemented for this container)", Path: "/dev/userfaultfd", Err: unix.EPERM}
	if f := fixes(Check(r)); strings.Contains(f, "CONFIG_USERFAULTFD") {
		t.Errorf("an EPERM judged as a kernel without userfaultfd:\n%s", f)
	}
}

func TestNilAndEmptyReport(t *testing.T) {
	for _, r := range []*uffd.Report{nil, {}} {
		res := Check(r)
		if res.OK {
			t.Errorf("empty report judged OK: %s", res.Summary)
		}
		if _, err := json.Marshal(res); err != nil {
			t.Errorf("marshal: %v", err)
		}
		_ = text(t, res)
	}
}

func TestJSONShape(t *testing.T) {
	r := healthy()
	r.MinorShmemMemfd = os.NewSyscallError("ioctl UFFDIO_REGISTER", unix.EINVAL)
	b, err := json.Marshal(Check(r))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"report", "functional", "checks", "backings", "ok", "summary"} {
		if _, ok := m[k]; !ok {
			t.Errorf("JSON lacks %q: %s", k, b)
		}
	}
	if got := m["functional"].(map[string]any)["minor_shmem_memfd"]; !strings.Contains(got.(string), "invalid argument") {
		t.Errorf("functional.minor_shmem_memfd = %v", got)
	}
}

func TestSizeName(t *testing.T) {
	for n, want := range map[int64]string{4096: "4 KiB", mib2: "2 MiB", 1 << 30: "1 GiB", 1000: "1000 B"} {
		if got := sizeName(n); got != want {
			t.Errorf("sizeName(%d) = %q, want %q", n, got, want)
		}
	}
	if got := mountOpt(1 << 30); got != "1G" {
		t.Errorf("mountOpt(1G) = %q", got)
	}
}
