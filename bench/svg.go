package bench

import (
	"fmt"
	"html"
	"io"
	"math"
	"strings"
)

// Colours per strategy (colour-blind-safe Okabe-Ito palette).
var strategyColor = map[string]string{
	"eager":           "#0072B2",
	"lazy":            "#D55E00",
	"prefetch":        "#009E73",
	"raw-read":        "#CC79A7",
	"decompress-anon": "#E69F00",
	"uffd-copy":       "#56B4E9",
}

func colorOf(s string) string {
	if c, ok := strategyColor[s]; ok {
		return c
	}
	return "#666666"
}

type svgBuf struct{ strings.Builder }

func (b *svgBuf) f(format string, args ...any) { fmt.Fprintf(&b.Builder, format, args...) }

func (b *svgBuf) text(x, y float64, anchor, class, s string) {
	b.f(`<text x="%.1f" y="%.1f" text-anchor="%s" class="%s">%s</text>`+"\n", x, y, anchor, class, html.EscapeString(s))
}

// logAxis maps [lo, hi] (decades) onto [x0, x1].
type logAxis struct{ lo, hi, x0, x1 float64 }

func (a logAxis) at(v float64) float64 {
	v = math.Max(v, math.Pow(10, a.lo))
	return a.x0 + (math.Log10(v)-a.lo)/(a.hi-a.lo)*(a.x1-a.x0)
}

func decades(minV, maxV float64) (lo, hi float64) {
	lo = math.Floor(math.Log10(math.Max(minV, 1e-3)))
	hi = math.Ceil(math.Log10(math.Max(maxV, 1e-3)))
	if hi <= lo {
		hi = lo + 1
	}
	return lo, hi
}

func fmtTick(v float64, unit string) string {
	switch {
	case v >= 1e6 && unit == "ms":
		return fmt.Sprintf("%g ks", v/1e6)
	case v >= 1000 && unit == "ms":
		return fmt.Sprintf("%g s", v/1000)
	case v >= 1000 && unit == "µs":
		return fmt.Sprintf("%g ms", v/1000)
	}
	return fmt.Sprintf("%g %s", v, unit)
}

// WriteSVG draws the summaries: per pattern, a bar per strategy for the
// time to ready and the time to complete (median, min-max whiskers, log
// scale), and a touch-latency CDF panel (tail on a "nines" scale).
func (r *Report) WriteSVG(w io.Writer) error {
	const width = 1000.0
	const left, right = 250.0, 60.0
	const barH, caseGap, groupGap = 11.0, 10.0, 34.0

	var patterns []string
	byPattern := map[string][]CaseSummary{}
	for _, c := range r.Summary {
		if _, ok := byPattern[c.Pattern]; !ok {
			patterns = append(patterns, c.Pattern)
		}
		byPattern[c.Pattern] = append(byPattern[c.Pattern], c)
	}
	minV, maxV := math.Inf(1), 0.0
	for _, c := range r.Summary {
		for _, k := range []string{MReady, MComplete} {
			s := c.Metrics[k]
			if s.Min > 0 {
				minV = math.Min(minV, s.Min)
			}
			maxV = math.Max(maxV, s.Max)
		}
	}
	if math.IsInf(minV, 1) {
		minV = 0.01
	}
	lo, hi := decades(minV, maxV)
	ax := logAxis{lo, hi, left, width - right}

	var b svgBuf
	y := 0.0
	// Header.
	b.f("<g>\n")
	b.text(20, 30, "start", "title", "uffdrestore bench: time to ready and to complete (median, whiskers min-max)")
	hy := 50.0
	for _, l := range r.Header() {
		if len(l) > 165 {
			l = l[:162] + "..."
		}
		b.text(20, hy, "start", "small", l)
		hy += 15
	}
	b.f("</g>\n")
	y = hy + 25

	// Legend for the bar kinds.
	b.f(`<rect x="%.1f" y="%.1f" width="22" height="%.1f" fill="#888" fill-opacity="0.45"/>`+"\n", left, y-10, barH)
	b.text(left+28, y, "start", "label", "time to ready")
	b.f(`<rect x="%.1f" y="%.1f" width="22" height="%.1f" fill="#888"/>`+"\n", left+150, y-10, barH)
	b.text(left+178, y, "start", "label", "time to complete (access pattern done)")
	y += 22

	plotTop := y
	for _, p := range patterns {
		b.text(20, y+12, "start", "group", "pattern "+p)
		y += 22
		for _, c := range byPattern[p] {
			col := colorOf(c.Strategy)
			b.text(left-10, y+barH+2, "end", "label", c.Name())
			for k, key := range []string{MReady, MComplete} {
				s := c.Metrics[key]
				by := y + float64(k)*(barH+2)
				x1 := ax.at(s.Median)
				op := "0.45"
				if k == 1 {
					op = "1"
				}
				b.f(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" fill-opacity="%s"><title>%s %s: median %s ms [%s-%s]</title></rect>`+"\n",
					ax.x0, by, math.Max(1, x1-ax.x0), barH, col, op, html.EscapeString(c.Name()), key, fmtNum(s.Median), fmtNum(s.Min), fmtNum(s.Max))
				// Whisker.
				wl, wr, cy := ax.at(s.Min), ax.at(s.Max), by+barH/2
				b.f(`<path d="M%.1f %.1fH%.1fM%.1f %.1fV%.1fM%.1f %.1fV%.1f" stroke="#222" stroke-width="1.2" fill="none"/>`+"\n",
					wl, cy, wr, wl, cy-4, cy+4, wr, cy-4, cy+4)
				b.text(math.Max(wr, x1)+6, by+barH-1.5, "start", "value", fmtNum(s.Median)+" ms")
			}
			y += 2*barH + 2 + caseGap
		}
		y += groupGap - caseGap
	}
	plotBottom := y - groupGap + caseGap
	// Grid and axis.
	var grid svgBuf
	for d := lo; d <= hi; d++ {
		for m := 1.0; m < 10; m++ {
			v := m * math.Pow(10, d)
			if d == hi && m > 1 {
				break
			}
			x := ax.at(v)
			if m == 1 {
				grid.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" class="grid"/>`+"\n", x, plotTop, x, plotBottom)
				grid.text(x, plotBottom+16, "middle", "tick", fmtTick(v, "ms"))
			} else {
				grid.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" class="minor"/>`+"\n", x, plotTop, x, plotBottom)
			}
		}
	}
	grid.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" class="axis"/>`+"\n", ax.x0, plotBottom, ax.x1, plotBottom)
	grid.text((ax.x0+ax.x1)/2, plotBottom+36, "middle", "label", "time since the start of the restore (ms, log scale)")
	y = plotBottom + 70

	// Latency CDF panels, one per pattern.
	var cdf svgBuf
	cdfCases := 0
	for _, c := range r.Summary {
		if len(c.TouchCDF) > 0 {
			cdfCases++
		}
	}
	if cdfCases > 0 {
		cdf.text(20, y, "start", "title", "touch latency CDF: each page touch as the touching thread saw it")
		y += 20
		const panelH = 260.0
		n := float64(len(patterns))
		gap := 80.0
		pw := (width - 100 - gap*(n-1)) / n
		// Common x range.
		lmin, lmax := math.Inf(1), 0.0
		for _, c := range r.Summary {
			for _, pt := range c.TouchCDF {
				if pt.NS > 0 {
					lmin = math.Min(lmin, pt.NS/1e3)
				}
				lmax = math.Max(lmax, pt.NS/1e3)
			}
		}
		llo, lhi := decades(lmin, lmax)
		const nines = 5.0 // y up to 0.99999
		for i, p := range patterns {
			x0 := 70 + float64(i)*(pw+gap)
			x1 := x0 + pw
			top, bot := y+20, y+20+panelH
			lx := logAxis{llo, lhi, x0, x1}
			yOf := func(f float64) float64 {
				v := -math.Log10(math.Max(1-f, math.Pow(10, -nines)))
				return bot - v/nines*(bot-top)
			}
			cdf.text((x0+x1)/2, y+10, "middle", "group", "pattern "+p)
			for d := llo; d <= lhi; d++ {
				x := lx.at(math.Pow(10, d))
				cdf.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" class="grid"/>`+"\n", x, top, x, bot)
				cdf.text(x, bot+16, "middle", "tick", fmtTick(math.Pow(10, d), "µs"))
			}
			for k, lab := range []string{"0", "0.9", "0.99", "0.999", "0.9999", "0.99999"} {
				f := 1 - math.Pow(10, -float64(k))
				yy := yOf(f)
				cdf.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" class="grid"/>`+"\n", x0, yy, x1, yy)
				if i == 0 {
					cdf.text(x0-6, yy+4, "end", "tick", lab)
				}
			}
			cdf.f(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" class="frame"/>`+"\n", x0, top, pw, panelH)
			cdf.text((x0+x1)/2, bot+36, "middle", "label", "touch latency (µs, log scale)")
			if i == 0 {
				cdf.f(`<text transform="translate(%.1f %.1f) rotate(-90)" text-anchor="middle" class="label">fraction of touches at or below</text>`+"\n", x0-50, (top+bot)/2)
			}
			ly := bot + 60
			for _, c := range byPattern[p] {
				if len(c.TouchCDF) == 0 {
					continue
				}
				var d strings.Builder
				prevY := yOf(0)
				for j, pt := range c.TouchCDF {
					x := lx.at(math.Max(pt.NS/1e3, math.Pow(10, llo)))
					if j == 0 {
						fmt.Fprintf(&d, "M%.1f %.1f", x, prevY)
					}
					// Steps: up at x.
					fmt.Fprintf(&d, "H%.1fV%.1f", x, yOf(pt.Frac))
				}
				cdf.f(`<path d="%s" fill="none" stroke="%s" stroke-width="1.8"><title>%s</title></path>`+"\n", d.String(), colorOf(c.Strategy), html.EscapeString(c.Name()))
				cdf.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="3"/>`+"\n", x0, ly-4, x0+18, ly-4, colorOf(c.Strategy))
				cdf.text(x0+23, ly, "start", "small", fmt.Sprintf("%s: p99 %s µs, max %s", c.Name(), fmtNum(c.Metrics[MTouchP99].Median), fmtMicros(c.Metrics[MTouchMax].Median)))
				ly += 15
			}
		}
		most := 0
		for _, p := range patterns {
			most = max(most, len(byPattern[p]))
		}
		y += panelH + 90 + 15*float64(most)
	}

	height := y
	_, err := fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">
<style>
.title { font-size: 16px; font-weight: bold; fill: #111; }
.group { font-size: 13px; font-weight: bold; fill: #333; }
.label { font-size: 12px; fill: #222; }
.value { font-size: 10.5px; fill: #333; }
.tick { font-size: 10.5px; fill: #555; }
.small { font-size: 10.5px; fill: #444; }
.grid { stroke: #d0d0d0; stroke-width: 1; }
.minor { stroke: #eeeeee; stroke-width: 1; }
.axis { stroke: #444; stroke-width: 1; }
.frame { fill: none; stroke: #888; stroke-width: 1; }
</style>
<rect width="100%%" height="100%%" fill="white"/>
%s%s%s</svg>
`, width, height, width, height, grid.String(), b.String(), cdf.String())
	return err
}

// fmtMicros prints a latency given in µs, in ms from 1000 µs on.
func fmtMicros(us float64) string {
	if us >= 1000 {
		return fmtNum(us/1000) + " ms"
	}
	return fmtNum(us) + " µs"
}
