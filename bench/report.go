package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strings"
)

// SnapshotInfo describes the snapshot benchmarked.
type SnapshotInfo struct {
	Path        string         `json:"path"`
	Generated   string         `json:"generated,omitempty"` // "--generate SIZE --content C" when generated
	RawBytes    int64          `json:"raw_bytes"`
	StoredBytes int64          `json:"stored_bytes"`
	FileBytes   int64          `json:"file_bytes"`
	Chunks      int            `json:"chunks"`
	ChunkSize   int            `json:"chunk_size"`
	Codecs      map[string]int `json:"codecs"` // chunks per codec
}

// CaseSummary is the spread of every metric of one case over its timed
// runs.
type CaseSummary struct {
	Strategy     string            `json:"strategy"`
	Pattern      string            `json:"pattern"`
	Backing      string            `json:"backing,omitempty"`
	OutOfProcess bool              `json:"out_of_process,omitempty"`
	Metrics      map[string]Spread `json:"metrics"`
	// TouchCDF is the touch latency CDF of the run with the median
	// complete time (in-process runs only).
	TouchCDF []CDFPoint `json:"touch_cdf,omitempty"`
}

// Name is the strategy, marked when it ran out of process, with its
// backing in a --backing matrix.
func (c CaseSummary) Name() string {
	n := c.Strategy
	if c.OutOfProcess {
		n += " (oop)"
	}
	if c.Backing != "" {
		n += " [" + c.Backing + "]"
	}
	return n
}

// Report is a benchmark's result: where it ran, every run, and the
// summaries.
type Report struct {
	Command     string        `json:"command,omitempty"`
	Machine     Machine       `json:"machine"`
	Snapshot    SnapshotInfo  `json:"snapshot"`
	Layout      Layout        `json:"layout"`
	Threads     int           `json:"threads"`
	RunsPerCase int           `json:"runs_per_case"`
	Notes       []string      `json:"notes,omitempty"`
	Runs        []RunResult   `json:"runs"` // every run, warm-ups included (run -1)
	Summary     []CaseSummary `json:"summary"`
}

func (r *Report) summarize(cases []Case) {
	r.Summary = nil
	for _, c := range cases {
		cs := CaseSummary{Strategy: c.Strategy.Name, Pattern: c.Pattern.String(), Backing: c.backingName(), OutOfProcess: c.OutOfProcess, Metrics: map[string]Spread{}}
		var runs []RunResult
		for _, run := range r.Runs {
			if run.Run >= 0 && run.Error == "" && run.Strategy == cs.Strategy && run.Pattern == cs.Pattern && run.Backing == cs.Backing && run.OutOfProcess == cs.OutOfProcess {
				runs = append(runs, run)
			}
		}
		if len(runs) == 0 {
			continue
		}
		for _, k := range Metrics {
			xs := make([]float64, len(runs))
			for i, run := range runs {
				xs[i] = run.Metrics[k]
			}
			cs.Metrics[k] = Summarize(xs)
		}
		// The CDF of the run whose complete time is closest to the median.
		med, best := cs.Metrics[MComplete].Median, math.Inf(1)
		for _, run := range runs {
			if d := math.Abs(run.Metrics[MComplete] - med); d < best && run.TouchCDF != nil {
				best, cs.TouchCDF = d, run.TouchCDF
			}
		}
		r.Summary = append(r.Summary, cs)
	}
}

// WriteJSON writes the whole report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// Header is the lines that say what ran where.
func (r *Report) Header() []string {
	s := r.Snapshot
	snap := s.Path
	if s.Generated != "" {
		snap = s.Generated
	}
	codecs := []string{}
	for _, k := range []string{"zstd", "s2", "raw", "zero"} {
		if n := s.Codecs[k]; n > 0 {
			codecs = append(codecs, fmt.Sprintf("%s %d", k, n))
		}
	}
	for k, n := range s.Codecs {
		if !strings.Contains("zstd s2 raw zero", k) {
			codecs = append(codecs, fmt.Sprintf("%s %d", k, n))
		}
	}
	ratio := 0.0
	if s.StoredBytes > 0 {
		ratio = float64(s.RawBytes) / float64(s.StoredBytes)
	}
	var out []string
	if r.Command != "" {
		out = append(out, "command: "+r.Command)
	}
	out = append(out,
		"machine: "+r.Machine.String(),
		fmt.Sprintf("snapshot: %s: %.0f MiB raw, %.1f MiB stored (%.1fx), %d chunks of %d KiB (%s)",
			snap, mib(s.RawBytes), mib(s.StoredBytes), ratio, s.Chunks, s.ChunkSize>>10, strings.Join(codecs, ", ")),
		fmt.Sprintf("runs: %d timed per case, interleaved, after one untimed warm-up; %d touching thread(s); medians [min-max]", r.RunsPerCase, r.Threads),
	)
	for _, n := range r.Notes {
		out = append(out, "note: "+n)
	}
	return out
}

// column is one table column: a header and how to print a summary.
type column struct {
	head  string
	right bool
	cell  func(r *Report, c CaseSummary) string
}

func medianOf(c CaseSummary, k string) float64 { return c.Metrics[k].Median }

func fmtNum(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "-"
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	case a == 0:
		return "0"
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

func spreadCell(s Spread) string {
	return fmt.Sprintf("%s [%s-%s]", fmtNum(s.Median), fmtNum(s.Min), fmtNum(s.Max))
}

func pair(c CaseSummary, a, b string) string {
	if c.Metrics[MFaults].Median == 0 && strings.HasPrefix(a, "fault") {
		return "-"
	}
	return fmtNum(medianOf(c, a)) + " / " + fmtNum(medianOf(c, b))
}

// baseline returns the eager case of the same pattern (and backing, in a
// matrix; the first eager for a strategy without one), if any.
func (r *Report) baseline(c CaseSummary) (CaseSummary, bool) {
	for _, o := range r.Summary {
		if o.Strategy == "eager" && o.Pattern == c.Pattern && o.OutOfProcess == c.OutOfProcess && (o.Backing == c.Backing || c.Backing == "") {
			return o, true
		}
	}
	return CaseSummary{}, false
}

var columns = []column{
	{"pattern", false, func(_ *Report, c CaseSummary) string { return c.Pattern }},
	{"strategy", false, func(_ *Report, c CaseSummary) string { return c.Name() }},
	{"ready ms", true, func(_ *Report, c CaseSummary) string { return spreadCell(c.Metrics[MReady]) }},
	{"1st byte ms", true, func(_ *Report, c CaseSummary) string { return spreadCell(c.Metrics[MFirstByte]) }},
	{"complete ms", true, func(_ *Report, c CaseSummary) string { return spreadCell(c.Metrics[MComplete]) }},
	{"vs eager", true, func(r *Report, c CaseSummary) string {
		if b, ok := r.baseline(c); ok && medianOf(b, MComplete) > 0 {
			return fmt.Sprintf("%.2fx", medianOf(c, MComplete)/medianOf(b, MComplete))
		}
		return "-"
	}},
	{"faults", true, func(_ *Report, c CaseSummary) string { return fmt.Sprintf("%.0f", medianOf(c, MFaults)) }},
	{"fault p50/p99 us", true, func(_ *Report, c CaseSummary) string { return pair(c, MFaultP50, MFaultP99) }},
	{"touch p50/p99/max us", true, func(_ *Report, c CaseSummary) string {
		return pair(c, MTouchP50, MTouchP99) + " / " + fmtNum(medianOf(c, MTouchMax))
	}},
	{"decoded MiB", true, func(_ *Report, c CaseSummary) string { return fmt.Sprintf("%.0f", medianOf(c, MDecoded)) }},
	{"CPU ms", true, func(_ *Report, c CaseSummary) string { return fmtNum(medianOf(c, MCPU)) }},
	{"peak MiB", true, func(_ *Report, c CaseSummary) string { return fmtNum(medianOf(c, MMemPeak)) }},
}

func (r *Report) cells() [][]string {
	rows := [][]string{}
	for _, c := range r.Summary {
		row := make([]string, len(columns))
		for i, col := range columns {
			row[i] = col.cell(r, c)
		}
		rows = append(rows, row)
	}
	return rows
}

// WriteTable writes the header lines and an aligned table of medians.
func (r *Report) WriteTable(w io.Writer) error {
	var b strings.Builder
	for _, l := range r.Header() {
		b.WriteString(l + "\n")
	}
	b.WriteString("\n")
	rows := r.cells()
	width := make([]int, len(columns))
	for i, c := range columns {
		width[i] = len(c.head)
		for _, row := range rows {
			width[i] = max(width[i], len(row[i]))
		}
	}
	line := func(cells []string) {
		for i, s := range cells {
			if i > 0 {
				b.WriteString("  ")
			}
			pad := strings.Repeat(" ", width[i]-len(s))
			if columns[i].right {
				b.WriteString(pad + s)
			} else if i < len(cells)-1 {
				b.WriteString(s + pad)
			} else {
				b.WriteString(s)
			}
		}
		b.WriteString("\n")
	}
	heads := make([]string, len(columns))
	for i, c := range columns {
		heads[i] = c.head
	}
	line(heads)
	prev := ""
	for i, row := range rows {
		if i > 0 && row[0] != prev {
			b.WriteString("\n")
		}
		prev = row[0]
		line(row)
	}
	b.WriteString(legend)
	_, err := io.WriteString(w, b.String())
	return err
}

const legend = `
ready: start of restore -> memory usable; 1st byte: start of restore -> first touch returned (what a user
waits for the first byte: ready plus the first touch, which in lazy modes waits for the helper); complete: start -> access
pattern done; vs eager: complete time over eager's; faults: userfaultfd faults served (fault p50/p99: handler
service time); touch: latency of each page touch as the toucher saw it; CPU: user+system of this process, its
helper and target processes; peak: VmHWM of restorer (+ helper) + huge pages taken.
`

// WriteMarkdown writes the header lines as a list and a Markdown table.
func (r *Report) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	for _, l := range r.Header() {
		b.WriteString("- " + l + "\n")
	}
	b.WriteString("\n|")
	for _, c := range columns {
		b.WriteString(" " + c.head + " |")
	}
	b.WriteString("\n|")
	for _, c := range columns {
		if c.right {
			b.WriteString("---:|")
		} else {
			b.WriteString("---|")
		}
	}
	b.WriteString("\n")
	for _, row := range r.cells() {
		b.WriteString("|")
		for _, s := range row {
			b.WriteString(" " + s + " |")
		}
		b.WriteString("\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}
