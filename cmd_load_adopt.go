package main

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/attach"
)

// loadAdopted is the loader `load --adopt` made of the backing the first
// re-attaching target handed back.
type loadAdopted struct {
	mu sync.Mutex
	l  *restore.Loader
}

func (a *loadAdopted) get() *restore.Loader {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.l
}

func (a *loadAdopted) close() {
	if l := a.get(); l != nil {
		l.Close()
	}
}

// loadAdopt is the backend of `load --adopt`: it announces SNAP's layout
// for opts and adopts the backing the first re-attaching target hands
// back. It reports, on stderr, what it found there and how long after the
// server's start the first fault was served.
func loadAdopt(ctx context.Context, snap string, opts []restore.Option, start time.Time, stderr io.Writer, out *loadAdopted) (attach.Backend, restore.Layout, error) {
	plan, id, err := restore.PlanLayout(snap, opts...)
	if err != nil {
		return nil, plan, err
	}
	b := attach.NewAdoptBackend(attach.HelloOf(plan, id), func(fd int) (attach.Backend, error) {
		l, info, err := restore.AdoptLoader(ctx, snap, fd, opts...)
		if err != nil {
			return nil, err
		}
		out.mu.Lock()
		out.l = l
		out.mu.Unlock()
		fmt.Fprintf(stderr, "adopted: the backing handed back %.1f ms after start: %d units present (kept), %d partly present (only missing pages filled), %d absent (%d of them half-filled when the server died: punched); scanned in %.1f ms\n",
			float64(time.Since(start).Microseconds())/1000, info.Present, info.Partial, info.Absent, info.Punched, float64(info.Scan.Microseconds())/1000)
		go func() {
			// Polled every 100 µs: the first fault a re-attached target
			// raised (or had queued) that this server answered.
			for t := time.Now(); time.Since(t) < time.Minute; time.Sleep(100 * time.Microsecond) {
				if st := l.Stats(); st.FaultsMinor+st.FaultsMissing > 0 {
					fmt.Fprintf(stderr, "adopted: first fault served %.1f ms after start\n", float64(time.Since(start).Microseconds())/1000)
					return
				}
			}
		}()
		return attach.FromLoader(l), nil
	})
	return b, plan, nil
}
