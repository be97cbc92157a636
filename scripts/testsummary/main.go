// Command testsummary reads `go test -json` on stdin and prints what plain
// `go test` would (one line per package, the output of failing tests only),
// then one closing line that counts every test and subtest:
//
//	tests: 212 passed, 0 failed, 3 skipped
//
// A package that fails without a failing test (a build error, a panic in
// TestMain, the leak check) counts as one failure. With -o FILE the package
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
}

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

func (s *summary) closing() string {
	return fmt.Sprintf("tests: %d passed, %d failed, %d skipped", s.passed, s.failed, s.skipped)
}

func main() {
	outFile := flag.String("o", "", "also write the package lines and the closing line to this file")
	flag.Parse()
	s := &summary{out: os.Stdout, buf: map[key][]string{}, failedTests: map[string]int{}}
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		s.handle(sc.Text())
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "testsummary:", err)
		s.failed++
	}
	// Output of tests that never finished (the binary crashed or timed out).
	for k, out := range s.buf {
		if len(out) > 0 && s.failedTests[k.pkg] == 0 {
			fmt.Fprintf(os.Stdout, "--- output of unfinished %s %s:\n%s", k.pkg, k.test, strings.Join(out, ""))
		}
	}
	fmt.Println()
	fmt.Println(s.closing())
	if *outFile != "" {
		text := strings.Join(append(s.lines, s.closing()), "\n") + "\n"
		if err := os.WriteFile(*outFile, []byte(text), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "testsummary:", err)
			os.Exit(1)
		}
	}
	if s.failed > 0 || !s.sawEvent {
		os.Exit(1)
	}
}
