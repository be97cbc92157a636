// Package progress draws a one-line progress bar ("label  done / total  pct
// rate  ETA") on a terminal, and nothing anywhere else.
package progress

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Bar is a progress line. Update may be called from several goroutines.
type Bar struct {
	w     io.Writer
	label string
	on    bool
	start time.Time
	human func(uint64) string

	mu    sync.Mutex
	last  time.Time
	drawn bool
}

// New returns a bar drawn on w when w is a terminal and quiet is false
// (otherwise Update and Done do nothing). human formats byte counts.
func New(w io.Writer, label string, quiet bool, human func(uint64) string) *Bar {
	return &Bar{w: w, label: label, on: !quiet && IsTerminal(w), start: time.Now(), human: human}
}

// IsTerminal reports whether w is a terminal.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// Update redraws the line with done of total (0: unknown) bytes, at most
// ten times a second (and always at the end).
func (p *Bar) Update(done, total uint64) {
	if !p.on {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if now.Sub(p.last) < 100*time.Millisecond && done != total {
		return
	}
	p.last = now
	fmt.Fprintf(p.w, "\r\033[K%s", p.line(done, total, now))
	p.drawn = true
}

// line is the progress line at now: the rate so far and, from it, the time
// left.
func (p *Bar) line(done, total uint64, now time.Time) string {
	el := now.Sub(p.start).Seconds()
	rate := 0.0
	if el > 0 {
		rate = float64(done) / el
	}
	line := fmt.Sprintf("%s  %s", p.label, p.human(done))
	if total > 0 {
		line += fmt.Sprintf(" / %s  %3.0f%%", p.human(total), 100*float64(done)/float64(total))
	}
	line += fmt.Sprintf("  %s/s", p.human(uint64(rate)))
	if total > done && rate > 0 {
		left := time.Duration(float64(total-done) / rate * float64(time.Second))
		line += fmt.Sprintf("  ETA %s", left.Round(time.Second))
	}
	return line
}

// Done erases the line, if one was drawn.
func (p *Bar) Done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.on && p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
	}
}
