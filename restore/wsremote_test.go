package restore

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
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
	var gets atomic.Int64
	fs := http.FileServer(http.Dir(filepath.Dir(path)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gets.Add(1)
		time.Sleep(time.Millisecond) // a round trip worth merging requests for
		fs.ServeHTTP(w, r)
	}))
	defer srv.Close()
	url := srv.URL + "/" + filepath.Base(path)
	opts := kernelOpts(t, BackingShmem, 16<<20)
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
	t.Logf("working set %+v; remote %+v (at open: %d requests, %d bytes); profile: %d stored chunks, %d stored bytes",
		*s.WorkingSet, *s.Remote, opened.Requests, opened.BytesFetched, stChunks, stored)
	if s.WorkingSet.Prefilled != int64(len(units)) || s.WorkingSet.Late != 0 || s.UnitsPresent != int64(len(units)) {
		t.Fatalf("working set not prefilled ahead of faults: %+v, %d units present", *s.WorkingSet, s.UnitsPresent)
	}
	reqs := s.Remote.Requests - opened.Requests
	if reqs == 0 || reqs*4 > stChunks {
		t.Errorf("%d requests for the profile's %d stored chunks in 6 runs: neighbours not merged", reqs, stChunks)
	}
	if got := s.Remote.BytesFetched - opened.BytesFetched; got < stored || got > stored+stored/10 {
		t.Errorf("fetched %d bytes for the working set, its stored size is %d", got, stored)
	}
	if s.Remote.BytesFetched*3 > s.Remote.Size {
		t.Errorf("fetched %d of %d bytes of the file for a 20%% working set", s.Remote.BytesFetched, s.Remote.Size)
	}
	m, v := attachLocal(t, l, false)
	uffd.Touch(m.Addr(), m.Len(), 64<<10, false, units, nil)
	if vs := v.Stats(); vs.FaultsMinor+vs.FaultsMissing != 0 {
		t.Fatalf("touching the prefilled working set faulted %d times", vs.FaultsMinor+vs.FaultsMissing)
	}
	if err := l.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkRegions(t, m.Bytes(), l.Layout(), regions)
}
