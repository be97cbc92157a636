package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
)

// autoResult is what the uid 65534 child of TestAutoBackingNonRoot reports.
type autoResult struct {
	Backing       string `json:"backing"`
	UserModeOnly  bool   `json:"user_mode_only"`
	HugetlbUsable string `json:"hugetlb_usable"` // "" when usable, else why not (the doctor's view)
	Equal         bool   `json:"equal"`
}

const autoChildEnv = "UFFDRESTORE_AUTO_CHILD"

// TestAutoBackingNonRoot: for uid 65534 (which gets only a
// UFFD_USER_MODE_ONLY userfaultfd when vm.unprivileged_userfaultfd is 0 and
// /dev/userfaultfd is root's), BackingAuto picks the hugetlb memfd whenever
// the doctor's probe finds one usable for that user and the pool has room,
// and the restore reads right.
func TestAutoBackingNonRoot(t *testing.T) {
	if snap := os.Getenv(autoChildEnv); snap != "" {
		autoChild(t, snap)
		return
	}
	testutil.RequireRoot(t)
	testutil.RequireHugePages(t, 8)
	// The test binary and the snapshot where uid 65534 can read them.
	dir := testutil.SharedTempDir(t)
	bin := testutil.CopyTestBinary(t, dir, "restore.test")
	src := writeSnap(t, []testRegion{{"a", 0, testImage(6<<20, 11)}}, format.CodecS2, 2<<20)
	snap := filepath.Join(dir, "auto.snap")
	if err := os.Rename(src, snap); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(snap, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestAutoBackingNonRoot$", "-test.v")
	cmd.Env = append(os.Environ(), autoChildEnv+"="+snap)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child as uid 65534: %v\n%s", err, out)
	}
	_, js, ok := strings.Cut(string(out), "AUTO-RESULT ")
	var res autoResult
	if ok {
		js, _, _ = strings.Cut(js, "\n")
		err = json.Unmarshal([]byte(js), &res)
	}
	if !ok || err != nil {
		t.Fatalf("no result from the child (%v):\n%s", err, out)
	}
	t.Logf("uid 65534: auto -> %s (user-mode-only %v)", res.Backing, res.UserModeOnly)
	if !res.Equal {
		t.Errorf("uid 65534's restore (%s) differs from the image", res.Backing)
	}
	if res.HugetlbUsable != "" {
		testutil.Skip(t, "a hugetlb memfd is not usable for uid 65534 here: %s", res.HugetlbUsable)
	}
	if res.Backing != BackingMemfdHugetlb.String() {
		t.Errorf("auto picked %s for uid 65534 while a hugetlb memfd view registers fine for it", res.Backing)
	}
}

// autoChild runs as uid 65534: it restores snap with BackingAuto and says
// what it got, and whether the doctor's probe finds a hugetlb memfd usable.
func autoChild(t *testing.T, snap string) {
	rep := uffd.Probe()
	why := ""
	switch {
	case rep.UffdErr != nil:
		why = rep.UffdErr.Error()
	case !rep.FeatureOK(uffd.FeatureMinorHugetlbfs):
		why = "no minor faults on hugetlbfs"
	case rep.MinorHugetlbMemfd != nil:
		why = "registering a hugetlb memfd view: " + rep.MinorHugetlbMemfd.Error()
	case checkPool(6<<20) != nil:
		why = checkPool(6 << 20).Error()
	}
	r, err := Open(context.Background(), snap)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	res := autoResult{Backing: r.Backing().String(), UserModeOnly: r.UserModeOnly(), HugetlbUsable: why,
		Equal: bytes.Equal(r.Region("a"), testImage(6<<20, 11))}
	js, _ := json.Marshal(res)
	fmt.Printf("AUTO-RESULT %s\n", js)
}
