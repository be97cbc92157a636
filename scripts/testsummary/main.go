// Command testsummary reads `go test -json` on stdin and prints what plain
// `go test` would (one line per package, the output of failing tests only),
// then one closing line that counts every test and subtest:
//
//	tests: 212 passed, 0 failed, 3 skipped
//
// A package that fails without a failing test (a build error, a panic in
// TestMain, the leak check) counts as one failure.
//
// Skipped tests are listed before the closing line, grouped by reason (the
// reason with its numbers taken out): each group gives the reason as the
// test logged it, the fix, and every test that skipped for it:
//
//	skipped: 115 tests, 2 reasons
//	  [87] needs root (euid 1000)
//	       fix: run the tests as root: sudo make test
//	       restore: TestOpenLazy, TestOpenEager, ...
//	       restore/attach: TestAttachCTarget, ... With -o FILE the package
//
// lines and the closing line are also written to FILE, so a CI script can
// repeat them at the very end of its log. It exits 1 if anything failed.
//
// Usage: go test -json ./... | go run ./scripts/testsummary [-o FILE]
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
)

type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

type key struct{ pkg, test string }

type summary struct {
	out                     io.Writer
	lines                   []string // package lines, for -o
	buf                     map[key][]string
	passed, failed, skipped int
	failedTests             map[string]int // per package
	sawEvent                bool
	skips                   []skip
}

// skip is one skipped test and why.
type skip struct{ pkg, test, reason string }

func (s *summary) handle(line string) {
	var e event
	if !strings.HasPrefix(line, "{") || json.Unmarshal([]byte(line), &e) != nil || e.Action == "" {
		fmt.Fprintln(s.out, line) // not an event: a build error on stderr, for example
		return
	}
	s.sawEvent = true
	k := key{e.Package, e.Test}
	switch e.Action {
	case "build-output":
		fmt.Fprint(s.out, e.Output)
	case "build-fail":
		// Reported again as the package's "FAIL ... [build failed]" line.
	case "output":
		if e.Test != "" {
			s.buf[k] = append(s.buf[k], e.Output)
			return
		}
		o := e.Output
		if o == "PASS\n" || strings.HasPrefix(o, "=== ") {
			return
		}
		fmt.Fprint(s.out, o)
		if strings.HasPrefix(o, "ok ") || strings.HasPrefix(o, "FAIL\t") || strings.HasPrefix(o, "FAIL ") || strings.HasPrefix(o, "?") {
			s.lines = append(s.lines, strings.TrimRight(o, "\n"))
		}
	case "pass", "skip":
		if e.Test != "" {
			if e.Action == "pass" {
				s.passed++
			} else {
				s.skipped++
				s.skips = append(s.skips, skip{e.Package, e.Test, skipReason(s.buf[k])})
			}
			delete(s.buf, k)
		}
	case "fail":
		if e.Test != "" {
			s.failed++
			s.failedTests[e.Package]++
			for _, o := range s.buf[k] {
				fmt.Fprint(s.out, o)
			}
			delete(s.buf, k)
			return
		}
		if s.failedTests[e.Package] == 0 {
			s.failed++ // the package failed on its own
		}
	}
}

// skipReason is what a skipped test logged: its t.Skip message, without
// the "file_test.go:12: " prefix and the "=== RUN"/"--- SKIP" lines.
func skipReason(out []string) string {
	var lines []string
	for _, o := range out {
		for _, l := range strings.Split(strings.TrimRight(o, "\n"), "\n") {
			t := strings.TrimSpace(l)
			if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- ") {
				continue
			}
			if m := logPrefix.FindStringIndex(t); m != nil && m[0] == 0 {
				t = t[m[1]:]
			}
			lines = append(lines, t)
		}
	}
	if len(lines) == 0 {
		return "(no reason given)"
	}
	return strings.Join(lines, "; ")
}

var (
	logPrefix = regexp.MustCompile(`^[\w.-]+\.go:\d+: `)
	numbers   = regexp.MustCompile(`\d+`)
)

// fixes maps causes found in skip reasons to what makes the tests run.
// A reason that already names its fix after a colon ("... : echo N >
// /proc/sys/vm/nr_hugepages") gives that instead.
var fixes = []struct {
	re  *regexp.Regexp
	fix string
}{
	{regexp.MustCompile(`(?i)strict`), "none: informational"},
	{regexp.MustCompile(`(?i)huge pages`), "reserve huge pages as root: make hugepages (or echo N > /proc/sys/vm/nr_hugepages)"},
	{regexp.MustCompile(`(?i)UFFD_USER_MODE_ONLY|unprivileged_userfaultfd|/dev/userfaultfd|userfaultfd`), "allow userfaultfd for this user (sysctl vm.unprivileged_userfaultfd=1, or access to /dev/userfaultfd), or run as root; uffdrestore doctor says which"},
	{regexp.MustCompile(`(?i)needs root|need root|as root|euid`), "run the tests as root: sudo make test"},
	{regexp.MustCompile(`(?i)UFFDIO_POISON|Linux >= 6\.6`), "none on this kernel: needs Linux 6.6 or later"},
	{regexp.MustCompile(`(?i)minor faults|kernel lacks|not reported available on Linux`), "none on this kernel: needs a kernel with userfaultfd minor faults (Linux 5.13+ for shmem); uffdrestore doctor lists what it has"},
	{regexp.MustCompile(`(?i)gcc|sanitizer`), "install gcc (apt-get install gcc), with its sanitizer runtimes (libasan, libubsan)"},
	{regexp.MustCompile(`(?i)mount hugetlbfs`), "run as root on a kernel with hugetlbfs (mount -t hugetlbfs must work)"},
	{regexp.MustCompile(`(?i)race detector`), "none: run without -race (make test does, for this one)"},
	{regexp.MustCompile(`(?i)nothing to fix`), "none: informational"},
}

// fixFor returns the fix of a skip reason.
func fixFor(reason string) string {
	for _, w := range []string{": echo ", ": run ", ": sudo ", ": mount ", ": install "} {
		if i := strings.Index(reason, w); i >= 0 {
			return strings.TrimSpace(reason[i+2:])
		}
	}
	for _, f := range fixes {
		if f.re.MatchString(reason) {
			return f.fix
		}
	}
	return "unknown: read the reason; UFFDRESTORE_STRICT=1 turns this skip into a failure that shows where it comes from"
}

// skipReport lists the skipped tests grouped by reason, biggest group
// first; "" when nothing was skipped.
func (s *summary) skipReport() string {
	if len(s.skips) == 0 {
		return ""
	}
	type group struct {
		reason string
		tests  []skip
	}
	byKey := map[string]*group{}
	var groups []*group
	for _, sk := range s.skips {
		key := numbers.ReplaceAllString(sk.reason, "N")
		g := byKey[key]
		if g == nil {
			g = &group{reason: sk.reason}
			byKey[key] = g
			groups = append(groups, g)
		}
		g.tests = append(g.tests, sk)
	}
	sort.SliceStable(groups, func(i, j int) bool { return len(groups[i].tests) > len(groups[j].tests) })
	var b strings.Builder
	plural := "s"
	if len(groups) == 1 {
		plural = ""
	}
	fmt.Fprintf(&b, "skipped: %d tests, %d reason%s\n", len(s.skips), len(groups), plural)
	for _, g := range groups {
		fmt.Fprintf(&b, "  [%d] %s\n", len(g.tests), g.reason)
		fmt.Fprintf(&b, "       fix: %s\n", fixFor(g.reason))
		var pkgs []string
		byPkg := map[string][]string{}
		for _, sk := range g.tests {
			if _, ok := byPkg[sk.pkg]; !ok {
				pkgs = append(pkgs, sk.pkg)
			}
			byPkg[sk.pkg] = append(byPkg[sk.pkg], sk.test)
		}
		for _, p := range pkgs {
			fmt.Fprintf(&b, "       %s: %s\n", p, strings.Join(collapseSubtests(byPkg[p]), ", "))
		}
	}
	return b.String()
}

// collapseSubtests lists tests in order, writing several subtests of one
// test as "TestX/... (N subtests)".
func collapseSubtests(tests []string) []string {
	count := map[string]int{}
	for _, t := range tests {
		top, _, _ := strings.Cut(t, "/")
		count[top]++
	}
	var out []string
	seen := map[string]bool{}
	for _, t := range tests {
		top, _, sub := strings.Cut(t, "/")
		switch {
		case !sub || count[top] == 1:
			out = append(out, t)
		case !seen[top]:
			seen[top] = true
			out = append(out, fmt.Sprintf("%s/... (%d subtests)", top, count[top]))
		}
	}
	return out
}

func (s *summary) closing() string {
	return fmt.Sprintf("tests: %d passed, %d failed, %d skipped", s.passed, s.failed, s.skipped)
}

func main() {
	outFile := flag.String("o", "", "also write the package lines and the closing line to this file")
	flag.Parse()
	os.Exit(run(os.Stdin, os.Stdout, os.Stderr, *outFile))
}

// run summarizes the go test -json stream in and returns the exit status.
func run(in io.Reader, out, errw io.Writer, outFile string) int {
	s := &summary{out: out, buf: map[key][]string{}, failedTests: map[string]int{}}
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		s.handle(sc.Text())
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(errw, "testsummary:", err)
		s.failed++
	}
	// Output of tests that never finished (the binary crashed or timed out).
	for k, o := range s.buf {
		if len(o) > 0 && s.failedTests[k.pkg] == 0 {
			fmt.Fprintf(out, "--- output of unfinished %s %s:\n%s", k.pkg, k.test, strings.Join(o, ""))
		}
	}
	fmt.Fprintln(out)
	fmt.Fprint(out, s.skipReport())
	fmt.Fprintln(out, s.closing())
	if outFile != "" {
		text := s.skipReport() + s.closing() + "\n"
		if len(s.lines) > 0 {
			text = strings.Join(s.lines, "\n") + "\n" + text
		}
		if err := os.WriteFile(outFile, []byte(text), 0o644); err != nil {
			fmt.Fprintln(errw, "testsummary:", err)
			return 1
		}
	}
	if s.failed > 0 || !s.sawEvent {
		return 1
	}
	return 0
}
