package progress

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

func human(n uint64) string { return fmt.Sprintf("%dB", n) }

// The time left is computed in seconds (it once read 0s).
func TestLineETA(t *testing.T) {
	now := time.Now()
	p := &Bar{label: "create", start: now.Add(-10 * time.Second), human: human}
	line := p.line(100, 400, now) // 10 B/s, 300 B left
	for _, want := range []string{"create  100B / 400B   25%", "10B/s", "ETA 30s"} {
		if !strings.Contains(line, want) {
			t.Errorf("progress line %q: want %q", line, want)
		}
	}
	if l := p.line(100, 0, now); strings.Contains(l, "ETA") || strings.Contains(l, "%") {
		t.Errorf("unknown total: %q", l)
	}
}

// Not a terminal, or quiet: nothing is drawn.
func TestOffDrawsNothing(t *testing.T) {
	var b bytes.Buffer
	p := New(&b, "x", false, human)
	p.Update(1, 2)
	p.Done()
	if b.Len() != 0 || IsTerminal(&b) {
		t.Fatalf("drew %q on a buffer", b.String())
	}
	f, err := os.CreateTemp(t.TempDir(), "f")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if IsTerminal(f) {
		t.Fatal("a regular file is a terminal")
	}
}

// On: the line is drawn, rate-limited, always at the end, and erased.
func TestOnDrawsAndErases(t *testing.T) {
	var b bytes.Buffer
	p := &Bar{w: &b, label: "x", on: true, start: time.Now(), human: human}
	p.Update(1, 10)
	p.Update(2, 10) // within 100 ms: skipped
	p.Update(10, 10)
	p.Done()
	out := b.String()
	if strings.Count(out, "\r\033[K") != 3 || !strings.Contains(out, "x  1B / 10B") || strings.Contains(out, "2B / 10B") ||
		!strings.Contains(out, "10B / 10B  100%") || !strings.HasSuffix(out, "\r\033[K") {
		t.Fatalf("drawn %q", out)
	}
}
