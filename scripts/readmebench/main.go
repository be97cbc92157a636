// Command readmebench regenerates the benchmark tables in README.md by
// running the command each names: every block that begins with a line
// "- command: uffdrestore bench ARGS" (and ends with the Markdown table
// after it) is replaced by what `bin/uffdrestore bench ARGS` writes with
// --markdown. Blocks of `bench --check-targets` are left to that command's
// own --readme.
//
//	go run ./scripts/readmebench [-readme README.md] [-bin bin/uffdrestore] [-only SUBSTRING]
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

const prefix = "- command: uffdrestore bench "

// block is one table block of the README: lines [start, end) and the
// arguments of its command.
type block struct {
	start, end int
	args       []string
}

// findBlocks returns the README's regenerable blocks.
func findBlocks(lines []string) ([]block, error) {
	var out []block
	for i := 0; i < len(lines); i++ {
		if !strings.HasPrefix(lines[i], prefix) {
			continue
		}
		args := strings.Fields(strings.TrimPrefix(lines[i], prefix))
		if hasArg(args, "--check-targets") {
			continue
		}
		j := i + 1
		for j < len(lines) && strings.HasPrefix(lines[j], "- ") {
			j++
		}
		for j < len(lines) && strings.TrimSpace(lines[j]) == "" {
			j++
		}
		if j >= len(lines) || !strings.HasPrefix(lines[j], "|") {
			return nil, fmt.Errorf("line %d: the command is not followed by a table", i+1)
		}
		for j < len(lines) && strings.HasPrefix(lines[j], "|") {
			j++
		}
		out = append(out, block{start: i, end: j, args: args})
		i = j - 1
	}
	return out, nil
}

func hasArg(args []string, name string) bool {
	for _, a := range args {
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}

// withMarkdown returns args with --markdown set to file, and --quiet and
// --force.
func withMarkdown(args []string, file string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		switch {
		case args[i] == "--markdown" && i+1 < len(args):
			i++
		case strings.HasPrefix(args[i], "--markdown="):
		default:
			out = append(out, args[i])
		}
	}
	out = append(out, "--markdown", file)
	for _, f := range []string{"--quiet", "--force"} { // --force: replace the --svg/--json it names
		if !hasArg(out, f) {
			out = append(out, f)
		}
	}
	return out
}

// splice replaces each block b (from the end, so earlier indexes hold) by
// repl[b].
func splice(lines []string, blocks []block, repl [][]string) []string {
	for k := len(blocks) - 1; k >= 0; k-- {
		b := blocks[k]
		tail := append([]string(nil), lines[b.end:]...)
		lines = append(append(lines[:b.start], repl[k]...), tail...)
	}
	return lines
}

func main() {
	readme := flag.String("readme", "README.md", "the README to update")
	bin := flag.String("bin", "bin/uffdrestore", "the uffdrestore binary")
	only := flag.String("only", "", "regenerate only the blocks whose command contains this")
	flag.Parse()
	if err := run(*readme, *bin, *only); err != nil {
		fmt.Fprintln(os.Stderr, "readmebench:", err)
		os.Exit(1)
	}
}

func run(readme, bin, only string) error {
	raw, err := os.ReadFile(readme)
	if err != nil {
		return err
	}
	lines := strings.Split(string(raw), "\n")
	blocks, err := findBlocks(lines)
	if err != nil {
		return fmt.Errorf("%s: %w", readme, err)
	}
	if len(blocks) == 0 {
		return errors.New(readme + ": no `- command: uffdrestore bench` blocks")
	}
	dir, err := os.MkdirTemp("", "readmebench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var keep []block
	var repl [][]string
	for n, b := range blocks {
		if only != "" && !strings.Contains(strings.Join(b.args, " "), only) {
			continue
		}
		md := filepath.Join(dir, fmt.Sprintf("%d.md", n))
		args := append([]string{"bench"}, withMarkdown(b.args, md)...)
		fmt.Fprintf(os.Stderr, "readmebench: %s %s\n", bin, strings.Join(args, " "))
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("%s %s: %w", bin, strings.Join(args, " "), err)
		}
		out, err := os.ReadFile(md)
		if err != nil {
			return err
		}
		// The command line printed is the one the README names (its
		// --markdown target is this run's temporary file).
		text := strings.TrimRight(string(out), "\n")
		text = strings.Replace(text, md, markdownArg(b.args), 1)
		keep = append(keep, b)
		repl = append(repl, strings.Split(text, "\n"))
	}
	lines = splice(lines, keep, repl)
	return os.WriteFile(readme, []byte(strings.Join(lines, "\n")), 0o644)
}

// markdownArg is the --markdown value of args ("" when none).
func markdownArg(args []string) string {
	for i, a := range args {
		if a == "--markdown" && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, "--markdown="); ok {
			return v
		}
	}
	return ""
}
