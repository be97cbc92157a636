package main

import (
	"errors"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

func TestReorderArgs(t *testing.T) {
	app := &cli.App{Commands: []*cli.Command{{
		Name: "snapshot",
		Subcommands: []*cli.Command{{
			Name: "info",
			Flags: []cli.Flag{
				&cli.BoolFlag{Name: "json"},
				&cli.StringFlag{Name: "output", Aliases: []string{"o"}},
			},
		}},
	}}}
	cases := []struct{ in, want []string }{
		{[]string{"x", "snapshot", "info", "S", "--json"}, []string{"x", "snapshot", "info", "--json", "S"}},
		{[]string{"x", "snapshot", "info", "S", "-o", "F", "T"}, []string{"x", "snapshot", "info", "-o", "F", "S", "T"}},
		{[]string{"x", "snapshot", "info", "--output=F", "S"}, []string{"x", "snapshot", "info", "--output=F", "S"}},
		{[]string{"x", "snapshot", "info", "S", "--", "--json"}, []string{"x", "snapshot", "info", "S", "--", "--json"}},
		{[]string{"x", "snapshot", "info", "-", "--json"}, []string{"x", "snapshot", "info", "--json", "-"}},
		{[]string{"x", "unknown", "a", "--b"}, []string{"x", "unknown", "a", "--b"}},
	}
	for _, c := range cases {
		if got := reorderArgs(app, c.in); !reflect.DeepEqual(got, c.want) {
			t.Errorf("reorderArgs(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// TestHelpHasExamples checks every command's help shows an example.
func TestHelpHasExamples(t *testing.T) {
	var walk func(prefix string, cs []*cli.Command)
	walk = func(prefix string, cs []*cli.Command) {
		for _, c := range cs {
			if len(c.Subcommands) > 0 {
				walk(prefix+c.Name+" ", c.Subcommands)
				continue
			}
			if !containsExample(c.Description) {
				t.Errorf("command %q: help has no example (Description must contain \"Example\")", prefix+c.Name)
			}
		}
	}
	walk("", newApp().Commands)
}

func containsExample(s string) bool {
	for i := 0; i+7 <= len(s); i++ {
		if s[i:i+7] == "Example" {
			return true
		}
	}
	return false
}

// TestUnknownCommand: a mistyped command is named, with the nearest one,
// and exits 2 (urfave/cli said "No help topic for 'infoo'" and exited 3).
func TestUnknownCommand(t *testing.T) {
	app := newApp()
	for in, want := range map[string]string{
		"snapshot infoo":       "unknown command 'infoo'; did you mean 'info'?",
		"snapshot profile lst": "unknown command 'lst'; did you mean 'list'?",
		"lod x.snap":           "unknown command 'lod'; did you mean 'load'?",
		"infoo":                "unknown command 'infoo'; did you mean 'snapshot info'?",
		"snapshot qqqqq":       "unknown command 'qqqqq' (uffdrestore snapshot has: create, info,",
		"snapshot info x":      "",
		"snapshot --help":      "",
		"help load":            "",
		"load x --socket s":    "",
	} {
		got := unknownCommand(app, append([]string{"uffdrestore"}, strings.Fields(in)...))
		if (want == "") != (got == "") || !strings.Contains(got, want) {
			t.Errorf("%q: %q, want %q", in, got, want)
		}
	}
	cmd := doctorCmd(os.Args[0], "snapshot", "infoo")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "unknown command 'infoo'; did you mean 'info'?") {
		t.Errorf("uffdrestore snapshot infoo: %v, %q", err, out)
	}
}
