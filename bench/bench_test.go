package bench

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"github.com/uffdrestore/uffdrestore/internal/memgen"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/uffdrestore/uffdrestore/internal/testutil"
	// restore.Open's lazy strategies run their helper as this test binary.
	_ "github.com/uffdrestore/uffdrestore/restore/helper"
)

func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }

func TestSummarize(t *testing.T) {
	for _, tc := range []struct {
		in                    []float64
		med, min, max, q1, q3 float64
	}{
		{[]float64{5}, 5, 5, 5, 5, 5},
		{[]float64{3, 1, 2}, 2, 1, 3, 1.5, 2.5},
		{[]float64{4, 1, 3, 2}, 2.5, 1, 4, 1.75, 3.25},
		{[]float64{10, 1, 2, 3, 100}, 3, 1, 100, 2, 10},
		{[]float64{1, math.NaN(), 3}, 2, 1, 3, 1.5, 2.5},
	} {
		s := Summarize(tc.in)
		if s.Median != tc.med || s.Min != tc.min || s.Max != tc.max || s.Q1 != tc.q1 || s.Q3 != tc.q3 {
			t.Errorf("Summarize(%v) = %+v, want median %v min %v max %v q1 %v q3 %v", tc.in, s, tc.med, tc.min, tc.max, tc.q1, tc.q3)
		}
	}
	if s := Summarize(nil); s.N != 0 || !math.IsNaN(s.Median) {
		t.Errorf("Summarize(nil) = %+v", s)
	}
	if m := Median([]float64{9, 1, 5, 7}); m != 6 {
		t.Errorf("Median = %v, want 6", m)
	}
}

func TestPercentiles(t *testing.T) {
	lat := make([]uint64, 1000)
	for i := range lat {
		lat[i] = uint64(1000 - i) // 1..1000, reversed
	}
	l := LatencyOf(lat)
	if l.Count != 1000 || l.P50 != 500 || l.P90 != 900 || l.P99 != 990 || l.Max != 1000 {
		t.Errorf("LatencyOf(1..1000) = %+v", l)
	}
	if !slices.IsSorted(lat) {
		t.Error("LatencyOf did not sort")
	}
	if got := RankPercentile([]uint64{7}, 0.99); got != 7 {
		t.Errorf("one sample: %d", got)
	}
	if got := RankPercentile([]uint64{1, 2, 3, 4}, 0.5); got != 2 {
		t.Errorf("nearest rank p50 of 1..4 = %d, want 2", got)
	}
	if l := LatencyOf(nil); l.Count != 0 || l.Max != 0 {
		t.Errorf("LatencyOf(nil) = %+v", l)
	}
	cdf := CDF(lat, 100)
	if len(cdf) == 0 || len(cdf) > 102 {
		t.Fatalf("CDF has %d points", len(cdf))
	}
	for i := 1; i < len(cdf); i++ {
		if cdf[i].NS < cdf[i-1].NS || cdf[i].Frac < cdf[i-1].Frac {
			t.Fatalf("CDF not monotonic at %d: %+v %+v", i, cdf[i-1], cdf[i])
		}
	}
	if last := cdf[len(cdf)-1]; last.NS != 1000 || last.Frac != 1 {
		t.Errorf("CDF ends at %+v, want the max at 1", last)
	}
}

func TestScheduleInterleaves(t *testing.T) {
	got := Schedule(3, 2, true)
	want := []Slot{{0, -1}, {1, -1}, {2, -1}, {0, 0}, {1, 0}, {2, 0}, {0, 1}, {1, 1}, {2, 1}}
	if !slices.Equal(got, want) {
		t.Fatalf("Schedule(3, 2, warm-up) = %v, want %v", got, want)
	}
	if got := Schedule(2, 3, false); !slices.Equal(got, []Slot{{0, 0}, {1, 0}, {0, 1}, {1, 1}, {0, 2}, {1, 2}}) {
		t.Fatalf("Schedule(2, 3) = %v", got)
	}
	if !got[0].Warmup() || got[3].Warmup() {
		t.Error("Warmup()")
	}
	if Schedule(0, 5, true) != nil {
		t.Error("no cases: want no slots")
	}
}

func TestParsePattern(t *testing.T) {
	for in, want := range map[string]Pattern{
		"sequential":  {Sequential, 1},
		"seq":         {Sequential, 1},
		"Random":      {Random, 1},
		"sparse:0.1":  {Sparse, 0.1},
		"sparse:1":    {Sparse, 1},
		"sparse:25%":  {Sparse, 0.25},
		" sparse:.5 ": {Sparse, 0.5},
	} {
		got, err := ParsePattern(in)
		if err != nil || got != want {
			t.Errorf("ParsePattern(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "sparse", "sparse:", "sparse:0", "sparse:1.5", "sparse:-0.1", "sparse:x", "sparse:NaN", "zigzag"} {
		if _, err := ParsePattern(bad); err == nil {
			t.Errorf("ParsePattern(%q): want an error", bad)
		}
	}
	ps, err := ParsePatterns("sparse:0.1, sequential")
	if err != nil || len(ps) != 2 || ps[0].String() != "sparse:0.1" || ps[1].String() != "sequential" {
		t.Errorf("ParsePatterns = %v, %v", ps, err)
	}
	if p, _ := ParsePattern("sparse:0.1"); p.TargetArg() != "fraction:0.1" {
		t.Errorf("TargetArg = %s", p.TargetArg())
	}
}

func TestPatternOrder(t *testing.T) {
	l := Layout{Size: 8 << 20, ChunkSize: 2 << 20, Regions: []Region{{"a", 0, 3<<20 + 100}, {"b", 4 << 20, 2 << 20}}}
	pages := l.Pages()
	if len(pages) != 768+1+512 || pages[0] != 0 || pages[769] != 1024 {
		t.Fatalf("Pages: %d pages, [0]=%d [769]=%d", len(pages), pages[0], pages[769])
	}
	seq := Pattern{Kind: Sequential, Fraction: 1}.Order(pages, 1)
	if !slices.Equal(seq, pages) {
		t.Error("sequential is not the page list")
	}
	rnd := Pattern{Kind: Random, Fraction: 1}.Order(pages, 1)
	if slices.Equal(rnd, pages) {
		t.Error("random is in order")
	}
	if !slices.Equal(Pattern{Kind: Random}.Order(pages, 1), rnd) {
		t.Error("random is not reproducible from the seed")
	}
	sorted := slices.Clone(rnd)
	slices.Sort(sorted)
	if !slices.Equal(sorted, pages) {
		t.Error("random is not a permutation")
	}
	// Sparse: 3 blocks of 4 (0-2 MiB, 2-4 MiB, 4-6 MiB) at 0.5 → 2 whole blocks.
	sp := Pattern{Kind: Sparse, Fraction: 0.5}.Order(pages, 3)
	blocks := map[uint32]int{}
	for _, p := range sp {
		blocks[p/BlockPages]++
	}
	if len(blocks) != 2 {
		t.Fatalf("sparse:0.5 touched %d blocks, want 2 of 3", len(blocks))
	}
	for b, n := range blocks {
		want := 0
		for _, p := range pages {
			if p/BlockPages == b {
				want++
			}
		}
		if n != want {
			t.Errorf("block %d: %d pages touched, want all %d", b, n, want)
		}
	}
	if got := (Pattern{Kind: Sparse, Fraction: 0.0001}).Order(pages, 1); len(got) == 0 {
		t.Error("a tiny fraction must still touch one block")
	}
}

// fakeReport is a report as Run makes it, with made-up figures.
func fakeReport() *Report {
	r := &Report{Command: "uffdrestore bench --generate 16MiB", Machine: ThisMachine(), Threads: 1, RunsPerCase: 3,
		Snapshot: SnapshotInfo{Path: "x.snap", RawBytes: 16 << 20, StoredBytes: 4 << 20, Chunks: 8, ChunkSize: 2 << 20, Codecs: map[string]int{"zstd": 6, "zero": 2}},
		Notes:    []string{"a <note> & more"}}
	var cases []Case
	for _, p := range []Pattern{{Sparse, 0.1}, {Sequential, 1}} {
		for i, s := range Strategies {
			cases = append(cases, Case{Strategy: s, Pattern: p})
			for run := -1; run < 3; run++ {
				m := map[string]float64{}
				for k, name := range Metrics {
					m[name] = float64((i+1)*(k+1)) * (1 + 0.1*float64(run))
				}
				lat := []uint64{30, 40, 50, 60, 1e5, 2e6}
				r.Runs = append(r.Runs, RunResult{Strategy: s.Name, Pattern: p.String(), Run: run, Metrics: m, TouchCDF: CDF(lat, 10)})
			}
		}
	}
	r.summarize(cases)
	return r
}

func TestReportSummary(t *testing.T) {
	r := fakeReport()
	if len(r.Summary) != 2*len(Strategies) {
		t.Fatalf("%d summaries", len(r.Summary))
	}
	s := r.Summary[1] // lazy, sparse
	if s.Strategy != "lazy" || s.Metrics[MReady].N != 3 {
		t.Fatalf("summary %+v", s)
	}
	// ready_ms of lazy = 2*1*(1+0.1 run) for runs 0..2: the warm-up (run -1) is left out.
	if got := s.Metrics[MReady]; got.Median != 2.2 || math.Abs(got.Min-2) > 1e-9 || math.Abs(got.Max-2.4) > 1e-9 {
		t.Errorf("lazy ready spread %+v", got)
	}
}

func TestWriteTableAndMarkdown(t *testing.T) {
	r := fakeReport()
	var tb bytes.Buffer
	if err := r.WriteTable(&tb); err != nil {
		t.Fatal(err)
	}
	out := tb.String()
	for _, want := range []string{"machine: ", "command: uffdrestore bench", "ready ms", "complete ms", "vs eager", "uffd-copy", "sparse:0.1", "1.00x"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	// Aligned: every table row as long as the header line.
	lines := strings.Split(out, "\n")
	hdr := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, "pattern  ") })
	for _, l := range lines[hdr+1 : hdr+1+len(Strategies)] {
		if len(l) != len(lines[hdr]) {
			t.Errorf("row %q is %d wide, header %d", l, len(l), len(lines[hdr]))
		}
	}
	var md bytes.Buffer
	if err := r.WriteMarkdown(&md); err != nil {
		t.Fatal(err)
	}
	rows := 0
	for _, l := range strings.Split(md.String(), "\n") {
		if strings.HasPrefix(l, "|") {
			rows++
			if strings.Count(l, "|") != len(columns)+1 {
				t.Errorf("markdown row has %d cells: %s", strings.Count(l, "|")-1, l)
			}
		}
	}
	if rows != 2+len(r.Summary) {
		t.Errorf("markdown has %d table rows, want %d", rows, 2+len(r.Summary))
	}
}

func TestWriteJSONHasEveryMetric(t *testing.T) {
	r := fakeReport()
	var b bytes.Buffer
	if err := r.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Runs) != len(r.Runs) || len(back.Summary) != len(r.Summary) || back.Machine.Cores == 0 {
		t.Fatalf("round trip lost data: %d runs, %d summaries", len(back.Runs), len(back.Summary))
	}
	CheckReportComplete(t, &back)
}

// CheckReportComplete fails t unless every run and summary has every metric.
func CheckReportComplete(t *testing.T, r *Report) {
	t.Helper()
	for _, run := range r.Runs {
		for _, k := range Metrics {
			if _, ok := run.Metrics[k]; !ok {
				t.Errorf("run %s/%s/%d lacks %s", run.Strategy, run.Pattern, run.Run, k)
			}
		}
	}
	for _, s := range r.Summary {
		for _, k := range Metrics {
			if sp, ok := s.Metrics[k]; !ok || sp.N == 0 {
				t.Errorf("summary %s/%s lacks %s", s.Strategy, s.Pattern, k)
			}
		}
	}
}

func TestWriteSVGIsXML(t *testing.T) {
	r := fakeReport()
	var b bytes.Buffer
	if err := r.WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	CheckSVG(t, b.Bytes())
	for _, want := range []string{"time to ready", "touch latency", "lazy", "pattern sequential", "ms"} {
		if !bytes.Contains(b.Bytes(), []byte(want)) {
			t.Errorf("SVG lacks %q", want)
		}
	}
	// Empty report: still well-formed.
	b.Reset()
	if err := (&Report{}).WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	CheckSVG(t, b.Bytes())
}

// CheckSVG fails t unless b is well-formed XML with an <svg> root.
func CheckSVG(t *testing.T, b []byte) {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(b))
	root := ""
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok && root == "" {
			root = se.Name.Local
		}
	}
	if root != "svg" {
		t.Fatalf("root element %q, want svg", root)
	}
}

func TestVerifyMemory(t *testing.T) {
	dir := t.TempDir()
	img := make([]byte, 6<<20)
	memgen.Fill(img, 0)
	path := filepath.Join(dir, "img.raw")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	l := Layout{Size: 6 << 20, ChunkSize: 2 << 20, Regions: []Region{{"a", 0, 2<<20 + 5}, {"b", 4 << 20, 1 << 20}}}
	mem := slices.Clone(img)
	if err := VerifyMemory(path, l, mem); err != nil {
		t.Fatal(err)
	}
	mem[3<<20] ^= 1 // outside every region
	if err := VerifyMemory(path, l, mem); err != nil {
		t.Fatalf("a byte outside the regions: %v", err)
	}
	mem[4<<20+12345] ^= 0x80
	err := VerifyMemory(path, l, mem)
	if err == nil || !strings.Contains(err.Error(), "region b") || !strings.Contains(err.Error(), "4206649") {
		t.Fatalf("flipped byte: %v", err)
	}
	if err := VerifyMemory(path, l, mem[:5<<20]); err == nil {
		t.Fatal("short memory: want an error")
	}
}

func TestParseStrategies(t *testing.T) {
	s, err := ParseStrategies("lazy, uffd-copy")
	if err != nil || len(s) != 2 || s[0].Name != "lazy" || s[1].Name != "uffd-copy" {
		t.Fatalf("%v %v", s, err)
	}
	if s, _ := ParseStrategies("all"); len(s) != len(Strategies) {
		t.Fatalf("all: %d", len(s))
	}
	if _, err := ParseStrategies("lazy,mmap"); err == nil || !strings.Contains(err.Error(), "mmap") {
		t.Fatalf("unknown mode: %v", err)
	}
}
