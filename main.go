// Command uffdrestore restores memory snapshots into processes fast, filling
// pages lazily with userfaultfd minor faults.
//
// Each subcommand lives in its own cmd_*.go file and registers itself with
// registerCommand from an init function, so main.go stays small.
package main

import (
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/urfave/cli/v2"

	// restore.Open's lazy modes (demo, bench) serve faults from a helper
	// process: this program, run again. The import opts in.
	_ "github.com/uffdrestore/uffdrestore/restore/helper"
)

// version is the tool version, stamped into snapshot metadata.
var version = "0.1.0-dev"

var commands []*cli.Command

// registerCommand adds a top-level subcommand. Called from init functions.
func registerCommand(c *cli.Command) { commands = append(commands, c) }

func newApp() *cli.App {
	sort.Slice(commands, func(i, j int) bool { return commands[i].Name < commands[j].Name })
	return &cli.App{
		Name:    "uffdrestore",
		Usage:   "restore memory snapshots into processes fast (userfaultfd minor faults)",
		Version: version,
		Description: `uffdrestore loads a compressed, chunked memory snapshot into a hugetlbfs or
shmem backing file and fills pages lazily on first touch.

Examples:
   uffdrestore doctor
   uffdrestore snapshot create --from-file image.raw --output image.snap
   uffdrestore load image.snap --socket /run/uffdrestore.sock`,
		Commands:             commands,
		EnableBashCompletion: true,
		ExitErrHandler: func(c *cli.Context, err error) {
			if err == nil {
				return
			}
			if ec, ok := err.(cli.ExitCoder); ok {
				if msg := ec.Error(); msg != "" {
					fmt.Fprintln(os.Stderr, "uffdrestore:", msg)
				}
				os.Exit(ec.ExitCode())
			}
			fmt.Fprintln(os.Stderr, "uffdrestore:", err)
			os.Exit(1)
		},
	}
}

func main() {
	app := newApp()
	if msg := unknownCommand(app, os.Args); msg != "" {
		fmt.Fprintln(os.Stderr, "uffdrestore:", msg)
		os.Exit(2)
	}
	if err := app.Run(reorderArgs(app, os.Args)); err != nil {
		fmt.Fprintln(os.Stderr, "uffdrestore:", err)
		os.Exit(1)
	}
}

// reorderArgs moves the flags of the (sub)command being run in front of its
// positional arguments, so that "cmd SNAP --flag v" and "cmd --flag v SNAP"
// both work: urfave/cli v2 stops parsing flags at the first positional
// argument. Arguments after "--" are left alone.
func reorderArgs(app *cli.App, args []string) []string {
	if len(args) < 2 {
		return args
	}
	out := []string{args[0]}
	rest := args[1:]
	// Walk down the command tree while words name subcommands.
	cmds := app.Commands
	var cur *cli.Command
	for len(rest) > 0 {
		next := findCommand(cmds, rest[0])
		if next == nil {
			break
		}
		cur = next
		out = append(out, rest[0])
		rest = rest[1:]
		cmds = cur.Subcommands
	}
	if cur == nil {
		return args
	}
	var flags, positional []string
	for i := 0; i < len(rest); i++ {
		a := rest[i]
		if a == "--" {
			positional = append(positional, rest[i:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' || a == "-" {
			positional = append(positional, a)
			continue
		}
		flags = append(flags, a)
		if strings.Contains(a, "=") {
			continue
		}
		if takesValue(cur, strings.TrimLeft(a, "-")) && i+1 < len(rest) {
			flags = append(flags, rest[i+1])
			i++
		}
	}
	out = append(out, flags...)
	return append(out, positional...)
}

func findCommand(cmds []*cli.Command, name string) *cli.Command {
	for _, c := range cmds {
		if c.Name == name {
			return c
		}
		for _, a := range c.Aliases {
			if a == name {
				return c
			}
		}
	}
	return nil
}

// takesValue reports whether the named flag of c consumes the next argument.
func takesValue(c *cli.Command, name string) bool {
	for _, f := range c.Flags {
		for _, n := range f.Names() {
			if n != name {
				continue
			}
			if _, ok := f.(*cli.BoolFlag); ok {
				return false
			}
			if name == "help" || name == "h" {
				return false
			}
			return true
		}
	}
	return false
}

// unknownCommand returns the error for a command line whose command word
// names no command ("unknown command 'infoo'; did you mean 'info'?"), or "".
// urfave/cli would answer "No help topic for 'infoo'" with exit 3.
func unknownCommand(app *cli.App, args []string) string {
	cmds := app.Commands
	path := app.Name
	for _, a := range args[1:] {
		if a == "--" || strings.HasPrefix(a, "-") {
			return "" // flags (--help, --version, ...) are the app's to handle
		}
		if path == app.Name && (a == "help" || a == "h") && !app.HideHelpCommand {
			return ""
		}
		c := findCommand(cmds, a)
		if c == nil {
			var names []string
			for _, c := range cmds {
				if !c.Hidden {
					names = append(names, c.Name)
				}
			}
			msg := fmt.Sprintf("unknown command '%s'", a)
			m := closestName(a, names)
			for _, c := range cmds { // "infoo": "snapshot info"?
				if m != "" {
					break
				}
				var subs []string
				for _, s := range c.Subcommands {
					subs = append(subs, s.Name)
				}
				if sm := closestName(a, subs); sm != "" {
					m = c.Name + " " + sm
				}
			}
			if m != "" {
				msg += fmt.Sprintf("; did you mean '%s'?", m)
			}
			return msg + fmt.Sprintf(" (%s has: %s; see %s --help)", path, strings.Join(names, ", "), path)
		}
		if len(c.Subcommands) == 0 {
			return ""
		}
		cmds, path = c.Subcommands, path+" "+c.Name
	}
	return ""
}

// closestName is the name nearest to s by edit distance, if it is near
// enough to be a typo (at most 2 edits, or a prefix), else "".
func closestName(s string, names []string) string {
	best, bestD := "", 3
	for _, n := range names {
		d := editDistance(s, n)
		if strings.HasPrefix(n, s) && len(s) >= 2 {
			d = min(d, 1)
		}
		if d < bestD {
			best, bestD = n, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
