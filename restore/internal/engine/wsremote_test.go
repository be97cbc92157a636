package engine

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/remote"
)

// wsRemoteProfile: 6 runs of 8 neighbouring units of 64 KiB (about 20% of a
// 16 MiB image), listed the way a recorded profile interleaves them: no two
// consecutive entries are neighbours in the file.
func wsRemoteProfile() (format.Profile, []uint32) {
	starts := []uint32{3, 40, 90, 131, 170, 222}
	var units []uint32
	p := format.Profile{Name: "boot"}
	for k := uint32(0); k < 8; k++ {
		for _, s := range starts {
			units = append(units, s+k)
			p.Entries = append(p.Entries, format.ProfileEntry{Chunk: s + k, Rank: uint32(len(p.Entries))})
		}
	}
	return p, units
}

// TestWorkingSetRemote: a working-set restore of a snapshot served over
// HTTP fills the profile's units before any fault asks, reads them with a
// few large ranged requests (neighbouring chunks merged, not one request per
// chunk), fetches about the profile's stored bytes and not the whole file,
// and restores the image's bytes.
func TestWorkingSetRemote(t *testing.T) {
	regions := []testRegion{{"heap", 0, testImage(16<<20, 41)}}
	path := writeSnap(t, regions, format.CodecS2, 64<<10)
	prof, units := wsRemoteProfile()
	f, err := format.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	var stored, stChunks int64
	for _, u := range units {
		if ch := f.Chunk(int(u)); ch.Codec != format.CodecZero {
			stored += int64(ch.StoredLen)
			stChunks++
		}
	}
	f.Close()
	var inFlight, maxInFlight atomic.Int64
	fs := http.FileServer(http.Dir(filepath.Dir(path)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for m := maxInFlight.Load(); n > m && !maxInFlight.CompareAndSwap(m, n); m = maxInFlight.Load() {
		}
		time.Sleep(20 * time.Millisecond) // a round trip worth merging and overlapping requests for
		fs.ServeHTTP(w, r)
	}))
	defer srv.Close()
	url := srv.URL + "/" + filepath.Base(path)
	// One worker: the requests overlap because prefetch sends them so, not
	// because several workers each wait on one.
	opts := append(kernelOpts(t, BackingShmem, 16<<20), WithWorkers(1))
	// What opening costs (the header and the index): a lazy load's fetches.
	lazy, err := NewLoader(context.Background(), url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	opened := lazy.Stats().Remote
	lazy.Close()
	l, err := NewLoader(context.Background(), url, append(opts, WithProfile(ProfileSource{Profile: &prof}))...)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	deadline := time.Now().Add(10 * time.Second)
	for l.Stats().WorkingSet.Prefilled < int64(len(units)) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	s := l.Stats()
	t.Logf("working set %+v; remote %+v (at open: %d requests, %d bytes); profile: %d stored chunks, %d stored bytes; at most %d requests at once",
		*s.WorkingSet, *s.Remote, opened.Requests, opened.BytesFetched, stChunks, stored, maxInFlight.Load())
	if s.WorkingSet.Prefilled != int64(len(units)) || s.WorkingSet.Late != 0 || s.UnitsPresent != int64(len(units)) {
		t.Fatalf("working set not prefilled ahead of faults: %+v, %d units present", *s.WorkingSet, s.UnitsPresent)
	}
	reqs := s.Remote.Requests - opened.Requests
	if reqs == 0 || reqs*4 > stChunks {
		t.Errorf("%d requests for the profile's %d stored chunks in 6 runs: neighbours not merged", reqs, stChunks)
	}
	if maxInFlight.Load() < 3 {
		t.Errorf("the working set's 6 ranges were read at most %d at a time", maxInFlight.Load())
	}
	// (A chunk inside the first 4 KiB is served from the bytes of the open.)
	if got := s.Remote.BytesFetched - opened.BytesFetched; got < stored-4096 || got > stored+stored/10 {
		t.Errorf("fetched %d bytes for the working set, its stored size is %d", got, stored)
	}
	if s.Remote.BytesFetched*3 > s.Remote.Size {
		t.Errorf("fetched %d of %d bytes of the file for a 20%% working set", s.Remote.BytesFetched, s.Remote.Size)
	}
	m, v := attachLocal(t, l, false)
	touch.Touch(m.Addr(), m.Len(), 64<<10, false, units, nil)
	if vs := v.Stats(); vs.FaultsMinor+vs.FaultsMissing != 0 {
		t.Fatalf("touching the prefilled working set faulted %d times", vs.FaultsMinor+vs.FaultsMissing)
	}
	if err := l.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkRegions(t, m.Bytes(), l.Layout(), regions)
}

// TestWorkingSetRemoteFaultFirst: while a working set is fetched over a
// slow link, a fault outside it does not wait for the working set's
// requests: prefetch leaves one of the remote reader's request slots free
// for faults, and its worker serves faults while it waits for its ranges.
func TestWorkingSetRemoteFaultFirst(t *testing.T) {
	regions := []testRegion{{"heap", 0, testImage(16<<20, 42)}}
	path := writeSnap(t, regions, format.CodecS2, 64<<10)
	f, err := format.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	const faultUnit = 250 // not in the profile; its bytes come fast
	fast := int64(f.Chunk(faultUnit).Offset)
	if f.Chunk(faultUnit).Codec == format.CodecZero {
		t.Fatal("the fault's unit is a zero chunk: no request to time")
	}
	f.Close()
	// 4 units far apart, a request each, and those requests are slow.
	p := format.Profile{Name: "scattered"}
	for i := uint32(0); i < 4; i++ {
		p.Entries = append(p.Entries, format.ProfileEntry{Chunk: 8 + 40*i, Rank: i})
	}
	// Slow enough that a fault stuck behind one of them is told from one
	// that took the reader's retries (100 + 200 ms back-off) on a loaded machine.
	const slow = 1500 * time.Millisecond
	fs := http.FileServer(http.Dir(filepath.Dir(path)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var a int64
		if _, err := fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-", &a); err == nil && a < fast && a >= 4096 {
			time.Sleep(slow)
		}
		fs.ServeHTTP(w, r)
	}))
	defer srv.Close()
	url := srv.URL + "/" + filepath.Base(path)
	l, err := NewLoader(context.Background(), url, append(kernelOpts(t, BackingShmem, 16<<20), WithWorkers(1),
		WithRemote(remote.Options{Parallel: 2}), WithProfile(ProfileSource{Profile: &p}))...)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	m, _ := attachLocal(t, l, false)
	t0 := time.Now()
	touch.Touch(m.Addr(), m.Len(), 64<<10, false, []uint32{faultUnit}, nil)
	took := time.Since(t0)
	s := l.Stats()
	t.Logf("fault outside the working set answered in %v with %d of its %d units prefilled", took, s.WorkingSet.Prefilled, s.WorkingSet.Units)
	if s.WorkingSet.Missed != 1 || took >= slow/2 {
		t.Errorf("the fault waited %v for the working set's requests (%v each; %d of %d units prefilled, missed %d)",
			took, slow, s.WorkingSet.Prefilled, s.WorkingSet.Units, s.WorkingSet.Missed)
	}
	if b, want := m.Bytes()[faultUnit<<16:(faultUnit+1)<<16], regions[0].data[faultUnit<<16:(faultUnit+1)<<16]; !bytes.Equal(b, want) {
		t.Error("the faulted unit's bytes differ from the image's")
	}
}
