package engine

import (
	"cmp"
	"errors"
	"fmt"
	"slices"

	"github.com/uffdrestore/uffdrestore/format"
)

// Prefetch from a remote snapshot. A batch's units are read with a local
// file's method (runs of chunks back to back in claim order, one read at a
// time) would cost a round trip per run, one after another: a working set
// recorded in touch order seldom lists neighbours in the file one after the
// other. fillBatchRemote instead sorts the batch's stored ranges by offset,
// merges neighbours into spans, sends the spans in profile order (the span
// holding the earliest unit first) several at once, and decodes the units in
// profile order as their bytes arrive. Engine-wide, prefetch keeps at most
// fetchParallel-1 requests in flight, so a fault's read always finds a free
// request slot in the remote reader; and while a worker waits for its
// batch's bytes it serves faults first.

// fetchSpan is one ranged read of a batch: the file bytes [off, end).
type fetchSpan struct {
	off, end uint64
	first    int    // index in the batch of the earliest unit that needs it
	buf      []byte // where its bytes land
	done     chan error
	err      error
	waited   bool
}

// fetchPiece is one stored chunk of a batch.
type fetchPiece struct {
	off  uint64
	n    uint32
	c    int // chunk
	unit int // index in the batch
	span int
}

// remoteFetchSpan bounds a merged span (a batch holds at most
// prefetchBatchBytes of units).
const remoteFetchSpan = 4 << 20

func (e *engine) fillBatchRemote(w *workerState, units []uint32) {
	// The stored pieces of every unit not being refilled after a punch.
	var pieces []fetchPiece
	var total uint64
	for i, u := range units {
		if e.partial[u].Load() {
			continue
		}
		c0, c1, _ := e.unitChunks(u)
		for c := c0; c < c1; c++ {
			ch := e.r.Chunk(c)
			if ch.Codec == format.CodecZero {
				continue
			}
			pieces = append(pieces, fetchPiece{off: ch.Offset, n: ch.StoredLen, c: c, unit: i})
			total += uint64(ch.StoredLen)
		}
	}
	slices.SortFunc(pieces, func(a, b fetchPiece) int { return cmp.Compare(a.off, b.off) })
	// Merge neighbours in the file into spans.
	var spans []*fetchSpan
	for i := range pieces {
		p := &pieces[i]
		if k := len(spans); k > 0 && spans[k-1].end == p.off && p.off+uint64(p.n)-spans[k-1].off <= remoteFetchSpan {
			s := spans[k-1]
			s.end += uint64(p.n)
			s.first = min(s.first, p.unit)
			p.span = k - 1
			continue
		}
		p.span = len(spans)
		spans = append(spans, &fetchSpan{off: p.off, end: p.off + uint64(p.n), first: p.unit, done: make(chan error, 1)})
	}
	if uint64(len(w.rbuf)) < total {
		w.rbuf = make([]byte, total)
	}
	var at uint64
	for _, s := range spans {
		s.buf = w.rbuf[at : at+s.end-s.off]
		at += s.end - s.off
	}
	// Send them in profile order, a few at once.
	order := slices.Clone(spans)
	slices.SortStableFunc(order, func(a, b *fetchSpan) int { return a.first - b.first })
	go func() {
		for i, s := range order {
			select {
			case e.fetchSem <- struct{}{}:
			case <-e.stop:
				for _, s := range order[i:] {
					s.done <- errEngineStopped
				}
				return
			}
			go func() {
				err := e.r.ReadStored(s.buf, int64(s.off))
				<-e.fetchSem
				if err == nil {
					e.c.bytesRead.Add(int64(len(s.buf)))
					e.c.reads.Add(1)
				} else {
					err = fmt.Errorf("restore: read chunks at %#x: %w", s.off, err)
				}
				s.done <- err
			}()
		}
	}()
	wait := func(s *fetchSpan) error {
		for !s.waited {
			select {
			case s.err = <-s.done:
				s.waited = true
			case fu := <-e.faultq:
				// Faults jump the queue (no unit is being decoded now).
				e.fill(w, fu, true)
			case r := <-e.splitq:
				e.helpSplit(w, r)
			case <-e.stop:
				return errEngineStopped
			}
		}
		return s.err
	}
	// The pieces of each unit, in chunk order: sort a copy by unit, then chunk.
	byUnit := slices.Clone(pieces)
	slices.SortFunc(byUnit, func(a, b fetchPiece) int {
		if a.unit != b.unit {
			return a.unit - b.unit
		}
		return a.c - b.c
	})
	next := 0
	for i, u := range units {
		start := next
		for next < len(byUnit) && byUnit[next].unit == i {
			next++
		}
		if e.partial[u].Swap(false) {
			e.publish(w, u, e.refillUnit(w, u), false)
			continue
		}
		var err error
		for _, p := range byUnit[start:next] {
			if err = wait(spans[p.span]); err != nil {
				break
			}
		}
		if err == errEngineStopped {
			// Closing: leave the rest (and rbuf, which reads in flight may
			// still write: this worker is ending).
			w.rbuf = nil
			return
		}
		pi := start
		e.fillStored(w, u, func(c int, ch format.Chunk) ([]byte, error) {
			if err != nil {
				return nil, err
			}
			if pi >= next {
				return nil, fmt.Errorf("restore: chunk %d: prefetch did not read its bytes", c)
			}
			p := byUnit[pi]
			pi++
			if p.c != c {
				return nil, fmt.Errorf("restore: chunk %d: prefetch read chunk %d's bytes for it", c, p.c)
			}
			s := spans[p.span]
			lo := p.off - s.off
			return s.buf[lo : lo+uint64(p.n)], nil
		})
	}
	// w.rbuf is reused by the next batch: every read must be over.
	for _, s := range spans {
		if wait(s) == errEngineStopped {
			w.rbuf = nil
			return
		}
	}
}

var errEngineStopped = errors.New("restore: closing")
