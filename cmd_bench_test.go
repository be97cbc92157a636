package main

import (
	"encoding/json"
	"encoding/xml"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/uffdrestore/uffdrestore/bench"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
)

// checkBenchJSON reads a bench --json file and checks every strategy ran
// every pattern, every run has every metric, and every run's memory was
// verified against the image byte for byte.
func checkBenchJSON(t *testing.T, path string, strategies, patterns []string, runs int) *bench.Report {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rep bench.Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("bench JSON: %v", err)
	}
	if rep.Machine.Cores == 0 || rep.Machine.Kernel == "" || rep.Command == "" {
		t.Errorf("machine/command missing: %+v %q", rep.Machine, rep.Command)
	}
	if want := len(strategies) * len(patterns) * (runs + 1); len(rep.Runs) != want {
		t.Errorf("%d runs in the JSON, want %d (warm-up included)", len(rep.Runs), want)
	}
	for _, r := range rep.Runs {
		if r.Error != "" {
			t.Errorf("%s/%s run %d: %s", r.Strategy, r.Pattern, r.Run, r.Error)
		}
		for _, k := range bench.Metrics {
			if _, ok := r.Metrics[k]; !ok {
				t.Errorf("%s/%s run %d lacks metric %s", r.Strategy, r.Pattern, r.Run, k)
			}
		}
		if r.Metrics[bench.MVerifiedOK] != 1 {
			t.Errorf("%s/%s run %d: memory not verified", r.Strategy, r.Pattern, r.Run)
		}
		if r.Metrics[bench.MComplete] < r.Metrics[bench.MReady] || r.Metrics[bench.MReady] <= 0 {
			t.Errorf("%s/%s run %d: ready %v ms, complete %v ms", r.Strategy, r.Pattern, r.Run, r.Metrics[bench.MReady], r.Metrics[bench.MComplete])
		}
	}
	got := map[string]bool{}
	for _, s := range rep.Summary {
		got[s.Strategy+"/"+s.Pattern] = true
		for _, k := range bench.Metrics {
			if sp := s.Metrics[k]; sp.N != runs {
				t.Errorf("summary %s/%s: %s over %d runs, want %d", s.Strategy, s.Pattern, k, sp.N, runs)
			}
		}
	}
	for _, s := range strategies {
		for _, p := range patterns {
			if !got[s+"/"+p] {
				t.Errorf("no summary for %s/%s", s, p)
			}
		}
	}
	return &rep
}

func TestBenchCLIEndToEnd(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireHugePages(t, 40)
	t.Setenv("TMPDIR", t.TempDir()) // the generated snapshot's cache
	dir := t.TempDir()
	js, svg, md := filepath.Join(dir, "b.json"), filepath.Join(dir, "b.svg"), filepath.Join(dir, "b.md")
	code, out, errOut := runSnapCLI(t, "bench", "--generate", "16MiB", "--runs", "2", "--pattern", "sparse:0.25,random",
		"--threads", "2", "--json", js, "--svg", svg, "--markdown", md)
	if code != 0 {
		t.Fatalf("bench exit %d\n%s\n%s", code, out, errOut)
	}
	for _, want := range []string{"machine: ", "ready ms", "uffd-copy", "decompress-anon", "raw-read", "sparse:0.25"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	rep := checkBenchJSON(t, js, bench.StrategyNames(), []string{"sparse:0.25", "random"}, 2)
	// Sparse lazy decodes less than eager; eager decodes everything.
	for _, s := range rep.Summary {
		dec := s.Metrics[bench.MDecoded].Median
		switch {
		case s.Strategy == "eager" && dec != 16:
			t.Errorf("eager decoded %v MiB, want 16", dec)
		case s.Strategy == "lazy" && s.Pattern == "sparse:0.25" && dec > 8:
			t.Errorf("lazy sparse:0.25 decoded %v MiB of 16", dec)
		case s.Strategy == "uffd-copy" && s.Metrics[bench.MFaults].Median == 0:
			t.Errorf("uffd-copy served no faults")
		}
	}
	b, err := os.ReadFile(svg)
	if err != nil {
		t.Fatal(err)
	}
	d := xml.NewDecoder(strings.NewReader(string(b)))
	for {
		if _, err := d.Token(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("SVG: %v", err)
		}
	}
	if m, err := os.ReadFile(md); err != nil || !strings.Contains(string(m), "| pattern |") {
		t.Errorf("markdown: %v\n%s", err, m)
	}
}

// benchTarget builds the example C target into a temporary directory.
func benchTarget(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat("csrc/target.c"); err != nil {
		testutil.Skip(t, "csrc/target.c is not there yet")
	}
	if _, err := exec.LookPath("gcc"); err != nil {
		testutil.Skip(t, "needs gcc for the example target")
	}
	exe := filepath.Join(t.TempDir(), "uffdrestore-target")
	cmd := exec.Command("gcc", "-O2", "-Wall", "-pthread", "-Icsrc", "-o", exe, "csrc/target.c", "csrc/ur_client.c")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the target: %v\n%s", err, out)
	}
	return exe
}

func TestBenchCLIOutOfProcess(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireHugePages(t, 40)
	target := benchTarget(t)
	t.Setenv("TMPDIR", t.TempDir())
	js := filepath.Join(t.TempDir(), "b.json")
	code, out, errOut := runSnapCLI(t, "bench", "--generate", "16MiB", "--runs", "2", "--pattern", "sparse:0.5,sequential",
		"--out-of-process", "--target", target, "--modes", "eager,lazy,prefetch", "--json", js)
	if code != 0 {
		t.Fatalf("bench exit %d\n%s\n%s", code, out, errOut)
	}
	rep := checkBenchJSON(t, js, []string{"eager", "lazy", "prefetch"}, []string{"sparse:0.5", "sequential"}, 2)
	for _, s := range rep.Summary {
		if !s.OutOfProcess {
			t.Errorf("%s/%s did not run out of process", s.Strategy, s.Pattern)
		}
	}
	if !strings.Contains(out, "(oop)") {
		t.Errorf("table does not mark out-of-process runs:\n%s", out)
	}
}

func TestBenchCLIErrors(t *testing.T) {
	for _, args := range [][]string{
		{"bench"},
		{"bench", "a.snap", "--generate", "1M"},
		{"bench", "--generate", "1M", "--pattern", "sparse:2"},
		{"bench", "--generate", "1M", "--modes", "lazy,mmap"},
		{"bench", "--generate", "1M", "--runs", "0"},
		{"bench", "--generate", "1M", "--backing", "nvme"},
		{"bench", "--generate", "1M", "--backing", "shmem,nvme"},
		{"bench", "a.snap", "b.snap"},
	} {
		code, _, errOut := runSnapCLI(t, args...)
		if code != 2 || errOut == "" {
			t.Errorf("%v: exit %d, stderr %q; want a usage error (2)", args, code, errOut)
		}
	}
}

// TestBenchCLIBackingMatrix: --backing all runs every restore strategy on
// a hugetlb memfd, a hugetlbfs file (on a mount of the bench's own) and
// shmem, side by side, and reports per backing the time to first byte as
// a user waits for it (t0 -> the first touch returned, never before ready)
// and the fault percentiles; the other strategies run once.
func TestBenchCLIBackingMatrix(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireHugePages(t, 40)
	t.Setenv("TMPDIR", t.TempDir())
	js := filepath.Join(t.TempDir(), "b.json")
	code, out, errOut := runSnapCLI(t, "bench", "--generate", "16MiB", "--runs", "1", "--pattern", "sparse:0.5",
		"--modes", "eager,lazy,raw-read", "--backing", "all", "--json", js)
	if code != 0 {
		t.Fatalf("bench exit %d\n%s\n%s", code, out, errOut)
	}
	b, err := os.ReadFile(js)
	if err != nil {
		t.Fatal(err)
	}
	var rep bench.Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	got := map[string]bench.CaseSummary{}
	for _, s := range rep.Summary {
		got[s.Name()] = s
	}
	want := []string{"raw-read"}
	for _, k := range []string{"memfd-hugetlb", "hugetlbfs", "shmem"} {
		want = append(want, "eager ["+k+"]", "lazy ["+k+"]")
	}
	if len(got) != len(want) {
		t.Errorf("cases %v, want %v", slices.Collect(maps.Keys(got)), want)
	}
	for _, name := range want {
		s, ok := got[name]
		if !ok {
			t.Errorf("no summary for %s:\n%s", name, out)
			continue
		}
		if !strings.Contains(out, name) {
			t.Errorf("the table has no row %q:\n%s", name, out)
		}
		m := func(k string) float64 { return s.Metrics[k].Median }
		if m(bench.MFirstByte) < m(bench.MReady) || m(bench.MFirstByte) <= 0 {
			t.Errorf("%s: first byte %v ms before ready %v ms: not what a user waits for", name, m(bench.MFirstByte), m(bench.MReady))
		}
		if strings.HasPrefix(name, "lazy") && (m(bench.MFaults) == 0 || m(bench.MFaultP50) <= 0 || m(bench.MFaultP99) < m(bench.MFaultP50)) {
			t.Errorf("%s: faults %v, p50 %v us, p99 %v us", name, m(bench.MFaults), m(bench.MFaultP50), m(bench.MFaultP99))
		}
	}
	for _, r := range rep.Runs {
		if r.Metrics[bench.MVerifiedOK] != 1 {
			t.Errorf("%s [%s] run %d: memory not verified", r.Strategy, r.Backing, r.Run)
		}
	}
}

// TestBenchCLICheckTargets: --check-targets measures every row of the
// performance targets (at small sizes here), each next to its target with
// a status, writes them as JSON, and replaces the README block it is given
// (and only that block).
func TestBenchCLICheckTargets(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireHugePages(t, 64)
	target := benchTarget(t)
	t.Setenv("TMPDIR", t.TempDir())
	dir := t.TempDir()
	js, readme := filepath.Join(dir, "t.json"), filepath.Join(dir, "README.md")
	before, after := "# title\n\ntext before\n", "\ntext after\n"
	if err := os.WriteFile(readme, []byte(before+bench.ReadmeBegin+"\nold table\n"+bench.ReadmeEnd+after), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runSnapCLI(t, "bench", "--check-targets", "--sizes", "small", "--runs", "1", "--target", target,
		"--json", js, "--readme", readme)
	if code != 0 {
		t.Fatalf("bench exit %d\n%s\n%s", code, out, errOut)
	}
	b, err := os.ReadFile(js)
	if err != nil {
		t.Fatal(err)
	}
	var tr bench.TargetsReport
	if err := json.Unmarshal(b, &tr); err != nil {
		t.Fatal(err)
	}
	wantRows := []string{"shmem / hugetlb memfd", "median time to touch", "first byte readable (", "helper prestarted", "Open returns",
		"full sequential touch / eager", "sparse:0.1 / eager", "single-core decode", "decode-only", "working set / lazy", "zstd -d -T0"}
	if len(tr.Rows) != len(wantRows) {
		t.Errorf("%d rows, want %d:\n%s", len(tr.Rows), len(wantRows), out)
	}
	for i, w := range wantRows {
		if i >= len(tr.Rows) {
			break
		}
		r := tr.Rows[i]
		if !strings.Contains(r.What, w) || r.Target == "" {
			t.Errorf("row %d is %q (target %q), want one about %q", i, r.What, r.Target, w)
		}
		if r.Error == "" && (r.Value <= 0 || r.Measured == "") {
			t.Errorf("row %q: value %v, measured %q", r.What, r.Value, r.Measured)
		}
		if r.Error != "" && !(w == "zstd -d -T0") {
			t.Errorf("row %q not measured: %s", r.What, r.Error)
		}
		if !strings.Contains(out, r.What) {
			t.Errorf("the table lacks the row %q:\n%s", r.What, out)
		}
		// The split row measures its floor beside it.
		if w == "single-core decode" && !strings.Contains(r.Measured, "floor on 2 cores: a fresh huge page's first write") {
			t.Errorf("row %q: no floor in %q", r.What, r.Measured)
		}
		// The first-byte rows say where the wait went, step by step.
		if w == "first byte readable (" || w == "helper prestarted" {
			if !strings.Contains(r.Measured, "where the") || !strings.Contains(r.Measured, "answers it") || strings.Contains(r.Measured, "no trace") {
				t.Errorf("row %q: no first-byte steps in %q", r.What, r.Measured)
			}
		}
	}
	if len(tr.Reports) == 0 {
		t.Error("the JSON keeps none of the interleaved benchmarks the rows come from")
	}
	got, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	s := string(got)
	if !strings.HasPrefix(s, before+bench.ReadmeBegin+"\n") || !strings.HasSuffix(s, bench.ReadmeEnd+after) ||
		strings.Contains(s, "old table") || !strings.Contains(s, "| what | measured | target | status |") ||
		!strings.Contains(s, "--check-targets") {
		t.Errorf("README after --readme:\n%s", s)
	}
}
