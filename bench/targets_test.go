package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
)

// exampleTarget builds the example C target (csrc/target.c) into a
// temporary directory.
func exampleTarget(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("gcc"); err != nil {
		testutil.Skip(t, "needs gcc for the example target")
	}
	exe := filepath.Join(t.TempDir(), "uffdrestore-target")
	cmd := exec.Command("gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-I../csrc", "-o", exe, "../csrc/target.c", "../csrc/ur_client.c")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the target: %v\n%s", err, out)
	}
	return exe
}

func smallTargetsEnv(t *testing.T) *Env {
	t.Helper()
	dir, err := CacheDir()
	if err != nil {
		t.Fatal(err)
	}
	snap, image, err := Generate(context.Background(), dir, SmallSizes.Targets, "realistic", format.CodecZstd, 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	f, err := format.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return &Env{Snap: snap, Image: image, Layout: LayoutOf(f.Reader)}
}

// TestManyTargetsRowHasFloor: the many-targets row carries, measured in
// the same run, the floor (processes mapping a filled memfd without
// userfaultfd) on shmem and on a hugetlb memfd, its shmem / memfd ratio and
// ours / floor on each backing; its value and target stay shmem / memfd of
// the restore, ≤ 2x.
func TestManyTargetsRowHasFloor(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireHugePages(t, 16)
	target := exampleTarget(t)
	t.Setenv("TMPDIR", t.TempDir())
	dir, err := CacheDir()
	if err != nil {
		t.Fatal(err)
	}
	cfg := TargetsConfig{CacheDir: dir, Sizes: SmallSizes, Runs: 1, Target: target, Log: t.Logf}
	var tr TargetsReport
	if err := targetManyTargets(context.Background(), &cfg, &tr); err != nil {
		t.Fatal(err)
	}
	if len(tr.Rows) != 1 {
		t.Fatalf("%d rows, want 1: %+v", len(tr.Rows), tr.Rows)
	}
	r := tr.Rows[0]
	re := regexp.MustCompile(`^([0-9.]+)x \(([0-9.]+) / ([0-9.]+) ms\); floor, no userfaultfd: [0-9.]+x \([0-9.]+ / [0-9.]+ ms\); ` +
		`uffdrestore / floor: shmem [0-9.]+x, memfd [0-9.]+x; floor shmem / uffdrestore memfd [0-9.]+x$`)
	if r.Error != "" || !re.MatchString(r.Measured) {
		t.Errorf("measured %q (error %q), want the restore's figures then the floor's", r.Measured, r.Error)
	}
	if r.Target != "≤ 2x" || r.Value <= 0 || r.Met != (r.Value <= 2) || !strings.Contains(r.What, "shmem / memfd") {
		t.Errorf("row %q: value %v, target %q, met %v: the criterion must stay the restore's shmem / memfd ≤ 2x", r.What, r.Value, r.Target, r.Met)
	}
	if !strings.Contains(r.How, "--map-file") || !strings.Contains(r.How, "no userfaultfd") {
		t.Errorf("how %q does not say what the floor ran", r.How)
	}
}

// TestFloorTouchesEveryPage: the floor's processes (uffdrestore-target
// --map-file on a filled memfd) touch every page of it, shmem and hugetlb,
// which the bench checks by their page count and checksum; a checksum that
// differs (a page not touched, or other bytes) is an error. The target
// refuses --map-file with the flags of a session.
func TestFloorTouchesEveryPage(t *testing.T) {
	target := exampleTarget(t)
	env := smallTargetsEnv(t)
	kinds := []bool{false}
	if testutil.FreeHugePages() >= 8 {
		kinds = append(kinds, true)
	} else if testutil.Strict() {
		t.Fatal("UFFDRESTORE_STRICT=1: the hugetlb floor needs 8 free huge pages")
	}
	for _, hugetlb := range kinds {
		ff, err := newFloorFile(env, hugetlb)
		if err != nil {
			t.Fatal(err)
		}
		defer ff.Close()
		wantPS := int64(os.Getpagesize())
		if hugetlb {
			wantPS = 2 << 20
		}
		if ff.pageSize != wantPS || ff.pages*ff.pageSize != SmallSizes.Targets || ff.checksum == 0 {
			t.Fatalf("hugetlb %v: floor file of %d pages of %d (checksum %d), want %d bytes in pages of %d",
				hugetlb, ff.pages, ff.pageSize, ff.checksum, SmallSizes.Targets, wantPS)
		}
		if ms, err := ff.run(context.Background(), target, 2); err != nil || ms <= 0 {
			t.Fatalf("hugetlb %v: floor run: %v ms, %v", hugetlb, ms, err)
		}
		ff.checksum++
		if _, err := ff.run(context.Background(), target, 1); err == nil || !strings.Contains(err.Error(), "checksum") {
			t.Errorf("hugetlb %v: a floor process whose checksum differs passed: %v", hugetlb, err)
		}
	}
	// --map-file has no server, so the flags about a session are refused
	// with the reason.
	f := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(f, make([]byte, 8192), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, extra := range [][]string{{"--socket", "x"}, {"--dump", "d"}, {"--private"}, {"--hold"}} {
		out, err := exec.Command(target, append([]string{"--map-file", f}, extra...)...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "--map-file maps a file without a server") {
			t.Errorf("--map-file %v: %v, %s", extra, err, out)
		}
	}
	out, err := exec.Command(target, "--map-file", f).Output()
	if err != nil || !strings.Contains(string(out), `"pages":2,`) || !strings.Contains(string(out), `"uffd":"none"`) {
		t.Errorf("--map-file on a 2-page file: %v, %s", err, out)
	}
}
