package main

import (
	"reflect"
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
