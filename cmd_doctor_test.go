package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore/doctor"
)

// TestDoctorHelperProcess is not a test: run by doctorCmd (and loadCmd) as a
// child, it is the uffdrestore binary (the usual os/exec helper-process
// pattern), so the real command runs with real signals and exit codes.
func TestDoctorHelperProcess(t *testing.T) {
	if os.Getenv("UFFDRESTORE_HELPER_MAIN") != "1" {
		return
	}
	args := []string{"uffdrestore"}
	for i, a := range os.Args {
		if a == "--" {
			args = append(args, os.Args[i+1:]...)
			break
		}
	}
	os.Args = args
	main()
	os.Exit(0)
}

// doctorCmd runs this test binary as "uffdrestore ARGS...".
func doctorCmd(exe string, args ...string) *exec.Cmd {
	cmd := exec.Command(exe, append([]string{"-test.run=^TestDoctorHelperProcess$", "--"}, args...)...)
	cmd.Env = append(os.Environ(), "UFFDRESTORE_HELPER_MAIN=1")
	return cmd
}

func runDoctorJSON(t *testing.T, cmd *exec.Cmd) (doctor.Result, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run doctor: %v", err)
	}
	var res doctor.Result
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("doctor --json: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	return res, code
}

func failedItems(res doctor.Result) string {
	var b strings.Builder
	for _, it := range res.Items {
		if it.Status == doctor.Fail || it.Status == doctor.Warn {
			b.WriteString(string(it.Status) + " " + it.Name + ": " + it.Detail + "\n")
		}
	}
	return b.String()
}

// TestDoctorThisMachine runs the real doctor. Where minor faults on hugetlbfs
// and shmem are missing it skips, which UFFDRESTORE_STRICT=1 (CI, as root on
// Linux 6.x) turns into a failure.
func TestDoctorThisMachine(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	res, code := runDoctorJSON(t, doctorCmd(exe, "doctor", "--json"))
	if code != res.ExitCode() {
		t.Errorf("exit code %d, but the result says %d (%s)", code, res.ExitCode(), res.Summary)
	}
	if res.Report == nil || res.Report.Kernel == "" {
		t.Fatalf("no kernel in the report: %+v", res.Report)
	}
	t.Logf("%s; Linux %s", res.Summary, res.Report.Kernel)
	if len(res.Backings) != 3 {
		t.Errorf("backings = %+v, want hugetlbfs, memfd-hugetlb, shmem", res.Backings)
	}

	if os.Geteuid() != 0 {
		testutil.Skip(t, "the availability checks below need root (euid %d)", os.Geteuid())
	}
	for _, f := range []string{"minor faults on hugetlbfs", "minor faults on shmem"} {
		if !res.Report.Features[f] {
			testutil.Skip(t, "%s not reported available on Linux %s:\n%s", f, res.Report.Kernel, failedItems(res))
		}
	}
	if res.Functional.MinorShmemMemfd != "ok" {
		t.Errorf("minor faults on shmem are reported, but registering a shmem view failed: %s", res.Functional.MinorShmemMemfd)
	}
	if !res.Backing(doctor.BackingShmem).Usable || code != 0 {
		t.Errorf("shmem backing not usable as root (exit %d):\n%s", code, failedItems(res))
	}
	if testutil.FreeHugePages() > 0 && !res.Backing(doctor.BackingMemfdHugetlb).Usable {
		t.Errorf("free huge pages, but memfd-hugetlb is not usable: %s", res.Backing(doctor.BackingMemfdHugetlb).Detail)
	}
}

// TestDoctorText checks the human output of the real doctor has every section.
func TestDoctorText(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	out, err := doctorCmd(exe, "doctor").Output()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	for _, want := range []string{"kernel:", "userfaultfd:", "features:", "huge pages:", "restore backings:", "doctor: "} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("doctor output lacks %q:\n%s", want, out)
		}
	}
}

// TestDoctorNonRoot runs the doctor as nobody: on a kernel where
// vm.unprivileged_userfaultfd is 0 and /dev/userfaultfd is root's, it must
// name the /dev/userfaultfd fix and still find shmem usable through
// UFFD_USER_MODE_ONLY.
func TestDoctorNonRoot(t *testing.T) {
	testutil.RequireRoot(t)
	// The test binary sits in a 0700 directory: copy it where nobody can run it.
	dir := testutil.SharedTempDir(t)
	copyExe := testutil.CopyTestBinary(t, dir, "uffdrestore.test")
	cmd := doctorCmd(copyExe, "doctor", "--json")
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	res, code := runDoctorJSON(t, cmd)
	p := res.Report.Permission
	if p.EUID != 65534 {
		t.Fatalf("doctor ran as euid %d", p.EUID)
	}
	t.Logf("as nobody: %s", res.Summary)
	if p.SyscallFull || p.DevAccessible {
		t.Skipf("nobody has full userfaultfd access here (vm.unprivileged_userfaultfd=%d, /dev/userfaultfd %s): nothing to fix", p.UnprivilegedSysctl, p.DevMode)
	}
	if !p.SyscallUserModeOnly {
		testutil.Skip(t, "UFFD_USER_MODE_ONLY refused for nobody: %s", p.SyscallErr)
	}
	var fix string
	for _, it := range res.Items {
		if it.Name == "userfaultfd access" {
			fix = strings.Join(it.Fix, "\n")
		}
	}
	if !strings.Contains(fix, "/dev/userfaultfd") {
		t.Errorf("no /dev/userfaultfd fix for nobody:\n%s", failedItems(res))
	}
	if !res.Report.Features["minor faults on shmem"] {
		testutil.Skip(t, "no minor faults on shmem on Linux %s", res.Report.Kernel)
	}
	sh := res.Backing(doctor.BackingShmem)
	if !sh.Usable || code != 0 {
		t.Errorf("shmem via UFFD_USER_MODE_ONLY not usable for nobody (exit %d): %s\n%s", code, sh.Detail, failedItems(res))
	}
	if !strings.Contains(sh.Limits, "EFAULT") {
		t.Errorf("shmem limits for nobody = %q, want the EFAULT limitation", sh.Limits)
	}
}
