package engine

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/touch"
	"github.com/uffdrestore/uffdrestore/snapshot"
)

// wsSnapshot: 16 units of 2 MiB (s2).
func wsSnapshot(t *testing.T) (string, []testRegion) {
	regions := []testRegion{{"heap", 0, testImage(32<<20, 21)}}
	return writeSnap(t, regions, format.CodecS2, 2<<20), regions
}

func TestRecordProfile(t *testing.T) {
	path, regions := wsSnapshot(t)
	l, err := NewLoader(context.Background(), path, append(kernelOpts(t, BackingMemfdHugetlb, 32<<20), WithRecord("boot"))...)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	m, _ := attachLocal(t, l, false)
	order := []uint32{9, 3, 3, 12, 0, 9}
	touch.Touch(m.Addr(), m.Len(), 2<<20, false, order, nil)
	p, err := l.Profile()
	if err != nil {
		t.Fatal(err)
	}
	var got []uint32
	for i, e := range p.Entries {
		got = append(got, e.Chunk)
		if e.Rank != uint32(i) || (i > 0 && e.TimeNS < p.Entries[i-1].TimeNS) {
			t.Fatalf("entry %d: rank %d, time %d: not in first-touch order", i, e.Rank, e.TimeNS)
		}
	}
	if p.Name != "boot" || !equalU32(got, []uint32{9, 3, 12, 0}) {
		t.Fatalf("profile %q = %v, want chunks [9 3 12 0] (first touches only)", p.Name, got)
	}
	checkRegions(t, m.Bytes(), l.Layout(), regions) // and the content is right
}

func equalU32(a, b []uint32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestWorkingSetReplay(t *testing.T) {
	path, regions := wsSnapshot(t)
	prof := format.Profile{Name: "boot", Entries: []format.ProfileEntry{{Chunk: 5, Rank: 0}, {Chunk: 1, Rank: 1}, {Chunk: 14, Rank: 2}}}
	if err := format.AppendProfile(path, prof); err != nil {
		t.Fatal(err)
	}
	l, err := NewLoader(context.Background(), path, append(kernelOpts(t, BackingMemfdHugetlb, 32<<20), WithProfile(ProfileSource{Name: "boot"}))...)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	// The working set is filled with no fault asking.
	deadline := time.Now().Add(10 * time.Second)
	for l.Stats().WorkingSet.Prefilled < 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	s := l.Stats()
	if s.WorkingSet == nil || s.WorkingSet.Units != 3 || s.WorkingSet.Prefilled != 3 {
		t.Fatalf("working set not prefilled: %+v", s.WorkingSet)
	}
	if s.UnitsPresent != 3 {
		t.Fatalf("%d units present, want only the working set's 3 (no prefetch of the rest)", s.UnitsPresent)
	}
	m, v := attachLocal(t, l, false)
	// Touching the working set costs no fault (premapped at attach).
	touch.Touch(m.Addr(), m.Len(), 2<<20, false, []uint32{5, 1, 14}, nil)
	if vs := v.Stats(); vs.FaultsMinor+vs.FaultsMissing != 0 {
		t.Fatalf("working-set touches faulted %d times", vs.FaultsMinor+vs.FaultsMissing)
	}
	// A unit outside it is a miss.
	touch.Touch(m.Addr(), m.Len(), 2<<20, false, []uint32{7}, nil)
	if s := l.Stats(); s.WorkingSet.Missed != 1 {
		t.Fatalf("missed = %d, want 1", s.WorkingSet.Missed)
	}
	if err := l.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	touch.Touch(m.Addr(), m.Len(), 4096, false, nil, nil)
	checkRegions(t, m.Bytes(), l.Layout(), regions)
}

func TestWorkingSetRejectsForeignProfile(t *testing.T) {
	path, _ := wsSnapshot(t)
	other := writeSnap(t, []testRegion{{"x", 0, testImage(4<<20, 99)}}, format.CodecS2, 2<<20)
	of, err := format.Open(other)
	if err != nil {
		t.Fatal(err)
	}
	side := filepath.Join(t.TempDir(), "other.profile.json")
	if err := SaveProfile(side, of.Reader, format.Profile{Name: "p", Entries: []format.ProfileEntry{{Chunk: 1}}}); err != nil {
		t.Fatal(err)
	}
	of.Close()
	opts := kernelOpts(t, BackingShmem, 0)
	if _, err := NewLoader(context.Background(), path, append(opts, WithProfile(ProfileSource{File: side}))...); !errors.Is(err, ErrForeignProfile) {
		t.Fatalf("foreign sidecar profile: %v, want ErrForeignProfile", err)
	}
	// Entries out of range, all or some: rejected (snapshot.CheckProfile).
	bad := format.Profile{Name: "stale", Entries: []format.ProfileEntry{{Chunk: 1000}}}
	if _, err := NewLoader(context.Background(), path, append(opts, WithProfile(ProfileSource{Profile: &bad}))...); !errors.Is(err, ErrForeignProfile) || !errors.Is(err, snapshot.ErrProfileRange) {
		t.Fatalf("out-of-range profile: %v, want ErrForeignProfile and ErrProfileRange", err)
	}
	mixed := format.Profile{Name: "stale", Entries: []format.ProfileEntry{{Chunk: 1000}, {Chunk: 2, Rank: 1}}}
	if _, err := NewLoader(context.Background(), path, append(opts, WithProfile(ProfileSource{Profile: &mixed}))...); !errors.Is(err, snapshot.ErrProfileRange) ||
		!strings.Contains(err.Error(), "1 of 2 entries") {
		t.Fatalf("partly out-of-range profile: %v, want ErrProfileRange", err)
	}
	// The same in a sidecar that carries this snapshot's identity (damaged
	// or edited): rejected too.
	fs, err := format.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	damaged := filepath.Join(t.TempDir(), "damaged.json")
	if err := SaveProfile(damaged, fs.Reader, mixed); err != nil {
		t.Fatal(err)
	}
	fs.Close()
	if _, err := NewLoader(context.Background(), path, append(opts, WithProfile(ProfileSource{File: damaged}))...); !errors.Is(err, ErrForeignProfile) || !errors.Is(err, snapshot.ErrProfileRange) {
		t.Fatalf("sidecar with out-of-range entries: %v", err)
	}
	if _, err := NewLoader(context.Background(), path, append(opts, WithProfile(ProfileSource{Name: "nope"}))...); !errors.Is(err, ErrNoProfile) {
		t.Fatalf("missing profile: %v, want ErrNoProfile", err)
	}
	// A sidecar recorded on this snapshot is accepted.
	f, _ := format.Open(path)
	own := filepath.Join(t.TempDir(), "own.json")
	SaveProfile(own, f.Reader, format.Profile{Name: "own", Entries: []format.ProfileEntry{{Chunk: 3}}})
	f.Close()
	l2, err := NewLoader(context.Background(), path, append(opts, WithProfile(ProfileSource{File: own}))...)
	if err != nil {
		t.Fatal(err)
	}
	l2.Close()
	os.Remove(own)
}

func TestMergeProfiles(t *testing.T) {
	a := format.Profile{Entries: []format.ProfileEntry{{Chunk: 1, Rank: 0, TimeNS: 10}, {Chunk: 2, Rank: 1, TimeNS: 20}, {Chunk: 3, Rank: 2, TimeNS: 30}}}
	b := format.Profile{Entries: []format.ProfileEntry{{Chunk: 3, Rank: 0, TimeNS: 5}, {Chunk: 1, Rank: 1, TimeNS: 9}, {Chunk: 4, Rank: 2, TimeNS: 50}}}
	m := MergeProfiles("m", a, b)
	var got []uint32
	for _, e := range m.Entries {
		got = append(got, e.Chunk)
	}
	// average ranks: 1: 0.5, 3: 1, 2: (1+3)/2=2, 4: (3+2)/2=2.5
	if !equalU32(got, []uint32{1, 3, 2, 4}) || m.Entries[1].TimeNS != 5 {
		t.Fatalf("merged = %v (%+v)", got, m.Entries)
	}
}

// TestPrefetchCoalescesReads: prefetch reads adjacent chunks with one pread.
func TestPrefetchCoalescesReads(t *testing.T) {
	regions := []testRegion{{"a", 0, testImage(8<<20, 31)}}
	path := writeSnap(t, regions, format.CodecZstd, 64<<10)
	l, err := NewLoader(context.Background(), path, append(kernelOpts(t, BackingShmem, 0), WithMode(ModePrefetch), WithWorkers(1))...)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	s := l.Stats()
	stored := int64(0)
	f, _ := format.Open(path)
	for i := 0; i < f.NumChunks(); i++ {
		if f.Chunk(i).Codec != format.CodecZero {
			stored++
		}
	}
	f.Close()
	if s.Reads == 0 || s.Reads*8 > stored {
		t.Fatalf("%d preads for %d stored chunks: reads not coalesced", s.Reads, stored)
	}
	m, _ := attachLocal(t, l, false)
	checkRegions(t, m.Bytes(), l.Layout(), regions)
}

// TestOpenRecordAndReplay: the in-process API records a profile, and a
// restore from it touches its working set without faulting.
func TestOpenRecordAndReplay(t *testing.T) {
	path, regions := wsSnapshot(t)
	opts := kernelOpts(t, BackingMemfdHugetlb, 32<<20)
	r := openT(t, path, append(opts, WithRecord("run"))...)
	mem := r.Region("heap")
	sinkByte += mem[11<<20] // unit 5
	sinkByte += mem[3<<20]  // unit 1
	p, err := r.Profile(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Entries) != 2 || p.Entries[0].Chunk != 5 || p.Entries[1].Chunk != 1 {
		t.Fatalf("recorded %+v", p.Entries)
	}
	r.Close()
	r2 := openT(t, path, append(opts, WithProfile(ProfileSource{Profile: &p}))...)
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := r2.Stats(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if s.WorkingSet.Prefilled == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("working set not prefilled: %+v", s.WorkingSet)
		}
		time.Sleep(time.Millisecond)
	}
	if !bytes.Equal(r2.Region("heap")[10<<20:12<<20], regions[0].data[10<<20:12<<20]) {
		t.Fatal("content differs")
	}
	if s, _ := r2.Stats(context.Background()); s.FaultsMinor+s.FaultsMissing != 0 {
		t.Fatalf("touching the prefilled working set faulted %d times", s.FaultsMinor+s.FaultsMissing)
	}
}

// SaveProfile writes through a temporary of its own: a link planted at a
// predictable temporary name (path.tmp) never redirects the write.
func TestSaveProfileIgnoresPlantedTemporary(t *testing.T) {
	path := writeSnap(t, []testRegion{{"x", 0, testImage(1<<20, 3)}}, format.CodecS2, 64<<10)
	f, err := format.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	side := filepath.Join(dir, "p.json")
	if err := os.Symlink(victim, side+".tmp"); err != nil {
		t.Fatal(err)
	}
	if err := SaveProfile(side, f.Reader, format.Profile{Name: "p", Entries: []format.ProfileEntry{{Chunk: 1}}}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep" {
		t.Fatalf("the planted link's target was overwritten: %q", b)
	}
	sc, err := LoadProfile(side)
	if err != nil || sc.Profile.Name != "p" {
		t.Fatalf("saved profile: %+v %v", sc, err)
	}
}

// StoreProfile appends a new profile, refuses a second of one name unless
// told to replace it, and then keeps its place (the CLI's profile add/merge
// and load --record all store through it).
func TestStoreProfile(t *testing.T) {
	path := writeSnap(t, []testRegion{{"x", 0, testImage(1<<20, 4)}}, format.CodecS2, 64<<10)
	profs := func() []format.Profile {
		f, err := format.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		return f.Profiles()
	}
	a := format.Profile{Name: "a", Entries: []format.ProfileEntry{{Chunk: 1}}}
	b := format.Profile{Name: "b", Entries: []format.ProfileEntry{{Chunk: 2}}}
	for _, p := range []format.Profile{a, b} {
		if err := StoreProfile(path, profs(), p, false); err != nil {
			t.Fatal(err)
		}
	}
	a2 := format.Profile{Name: "a", Entries: []format.ProfileEntry{{Chunk: 3}, {Chunk: 4, Rank: 1}}}
	if err := StoreProfile(path, profs(), a2, false); !errors.Is(err, ErrProfileExists) || !strings.Contains(err.Error(), `profile "a"`) {
		t.Fatalf("a second profile \"a\": %v, want ErrProfileExists", err)
	}
	if err := StoreProfile(path, profs(), a2, true); err != nil {
		t.Fatal(err)
	}
	ps := profs()
	if len(ps) != 2 || ps[0].Name != "a" || len(ps[0].Entries) != 2 || ps[1].Name != "b" {
		t.Fatalf("profiles after replace: %+v", ps)
	}
	if got := ReplaceProfile([]format.Profile{a, b, a}, a2); len(got) != 2 || len(got[0].Entries) != 2 || got[1].Name != "b" {
		t.Fatalf("ReplaceProfile with a repeated name: %+v", got)
	}
}

// mergeRef is MergeProfiles by its definition, pair by pair: a chunk's
// score is the sum over the profiles of its rank there (the last entry for
// it), or that profile's length when it is missing; its time is its
// earliest first touch in any profile.
func mergeRef(name string, ps ...format.Profile) format.Profile {
	var chunks []uint32
	seen := map[uint32]bool{}
	for _, p := range ps {
		for _, e := range p.Entries {
			if !seen[e.Chunk] {
				seen[e.Chunk] = true
				chunks = append(chunks, e.Chunk)
			}
		}
	}
	score := map[uint32]int{}
	first := map[uint32]uint64{}
	for _, c := range chunks {
		first[c] = ^uint64(0)
		for _, p := range ps {
			r, ok := 0, false
			for _, e := range p.Entries {
				if e.Chunk == c {
					r, ok = int(e.Rank), true
					first[c] = min(first[c], e.TimeNS)
				}
			}
			if !ok {
				r = len(p.Entries)
			}
			score[c] += r
		}
	}
	slices.SortFunc(chunks, func(a, b uint32) int {
		if score[a] != score[b] {
			return score[a] - score[b]
		}
		return int(a) - int(b)
	})
	out := format.Profile{Name: name}
	for i, c := range chunks {
		out.Entries = append(out.Entries, format.ProfileEntry{Chunk: c, Rank: uint32(i), TimeNS: first[c]})
	}
	return out
}

// randProfile is n entries over chunks [0, span), some chunks twice.
func randProfile(rng *rand.Rand, n, span int) format.Profile {
	p := format.Profile{Name: "r"}
	for i := 0; i < n; i++ {
		p.Entries = append(p.Entries, format.ProfileEntry{Chunk: uint32(rng.IntN(span)), Rank: uint32(i), TimeNS: uint64(rng.IntN(1000))})
	}
	return p
}

func TestMergeProfilesMatchesDefinition(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 200; i++ {
		var ps []format.Profile
		for k := rng.IntN(4); k >= 0; k-- {
			ps = append(ps, randProfile(rng, rng.IntN(40), 1+rng.IntN(60)))
		}
		got, want := MergeProfiles("m", ps...), mergeRef("m", ps...)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("case %d: MergeProfiles(%+v)\n= %+v\nwant %+v", i, ps, got, want)
		}
	}
}

// BenchmarkMergeProfiles merges two 16k-entry profiles (the quadratic
// merge took 0.68 s).
func BenchmarkMergeProfiles(b *testing.B) {
	rng := rand.New(rand.NewPCG(3, 4))
	a, c := randProfile(rng, 16384, 32768), randProfile(rng, 16384, 32768)
	for b.Loop() {
		MergeProfiles("m", a, c)
	}
}
