package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestSkipReport summarizes a recorded `go test -json` run as uid 65534
// (restore/uffd, internal/benchcache and part of restore/attach): every
// skipped test is listed under its reason, with the fix, grouped.
func TestSkipReport(t *testing.T) {
	in, err := os.ReadFile("testdata/nonroot.json")
	if err != nil {
		t.Fatal(err)
	}
	var out, errw bytes.Buffer
	file := filepath.Join(t.TempDir(), "summary.txt")
	if code := run(bytes.NewReader(in), &out, &errw, file); code != 0 {
		t.Fatalf("exit %d: %s", code, errw.String())
	}
	got := out.String()
	for _, want := range []string{
		"skipped: 25 tests, 4 reasons\n",
		"  [13] needs root (euid 65534)\n       fix: run the tests as root: sudo make test\n",
		"       github.com/uffdrestore/uffdrestore/restore/uffd: TestMinorRoundTrip/... (3 subtests), TestMissingMinorNoPrealloc/... (2 subtests), TestPrivateView/... (2 subtests), TestPoisonSIGBUS, TestErrorPaths, TestNoHugePagesFree, TestUserModeOnlyFallback\n",
		"       github.com/uffdrestore/uffdrestore/internal/benchcache: TestTwoUsers\n",
		"  [10] userfaultfd: userfaultfd: operation not permitted\n       fix: allow userfaultfd for this user",
		"TestEngineTargets/... (8 subtests), TestHostilePeers, TestShutdown\n",
		"  [1] probe checks below need root\n",
		"tests: 10 passed, 0 failed, 25 skipped\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("summary lacks %q:\n%s", want, got)
		}
	}
	// Every skipped test of the input is named (alone or as a subtest).
	for _, l := range bytes.Split(in, []byte("\n")) {
		var e event
		if json.Unmarshal(l, &e) != nil || e.Action != "skip" || e.Test == "" {
			continue
		}
		top, _, _ := strings.Cut(e.Test, "/")
		if !strings.Contains(got, " "+e.Test) && !strings.Contains(got, " "+top+"/...") {
			t.Errorf("skipped %s %s is not listed", e.Package, e.Test)
		}
	}
	b, _ := os.ReadFile(file)
	if !strings.Contains(string(b), "  [13] needs root (euid 65534)\n") || !strings.HasSuffix(string(b), "tests: 10 passed, 0 failed, 25 skipped\n") {
		t.Errorf("-o file:\n%s", b)
	}
}

func TestFixFor(t *testing.T) {
	for reason, want := range map[string]string{
		"needs 64 free huge pages, 0 free: echo 128 > /proc/sys/vm/nr_hugepages": "echo 128 > /proc/sys/vm/nr_hugepages",
		"needs root (euid 1000)":             "sudo make test",
		"UFFDIO_POISON needs Linux >= 6.6":   "Linux 6.6 or later",
		"needs gcc for the example target":   "install gcc",
		"kernel lacks minor faults on shmem": "minor faults",
		"something new":                      "unknown: read the reason",
	} {
		if got := fixFor(reason); !strings.Contains(got, want) {
			t.Errorf("fixFor(%q) = %q, want it to contain %q", reason, got, want)
		}
	}
}
