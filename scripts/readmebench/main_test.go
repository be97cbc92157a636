package main

import (
	"reflect"
	"strings"
	"testing"
)

const doc = `intro
- command: uffdrestore bench --generate 1GiB --runs 5 --markdown /tmp/a.md --quiet
- machine: old
- runs: 5

| a | b |
|---|---|
| 1 | 2 |

middle
- command: uffdrestore bench --check-targets --readme README.md

| row | target |
|---|---|
| x | y |

- command: uffdrestore bench --generate 4GiB --runs 3
| c |
|---|
end`

func TestBlocksAndSplice(t *testing.T) {
	lines := strings.Split(doc, "\n")
	bs, err := findBlocks(lines)
	if err != nil {
		t.Fatal(err)
	}
	if len(bs) != 2 || bs[0].start != 1 || bs[0].end != 8 || bs[1].start != 16 || bs[1].end != 19 {
		t.Fatalf("blocks %+v", bs)
	}
	if got := withMarkdown(bs[0].args, "/x.md"); !reflect.DeepEqual(got, []string{"--generate", "1GiB", "--runs", "5", "--quiet", "--markdown", "/x.md", "--force"}) {
		t.Errorf("withMarkdown: %q", got)
	}
	if got := withMarkdown(bs[1].args, "/y.md"); !reflect.DeepEqual(got, []string{"--generate", "4GiB", "--runs", "3", "--markdown", "/y.md", "--quiet", "--force"}) {
		t.Errorf("withMarkdown: %q", got)
	}
	out := strings.Join(splice(lines, bs, [][]string{{"NEW1"}, {"NEW2a", "NEW2b"}}), "\n")
	want := "intro\nNEW1\n\nmiddle\n- command: uffdrestore bench --check-targets --readme README.md\n\n| row | target |\n|---|---|\n| x | y |\n\nNEW2a\nNEW2b\nend"
	if out != want {
		t.Errorf("splice:\n%s\nwant\n%s", out, want)
	}
	if _, err := findBlocks([]string{"- command: uffdrestore bench --runs 1", "", "text"}); err == nil {
		t.Error("a command without a table: no error")
	}
}
