package attach

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/memgen"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore"
)

// These tests serve real snapshots with the real engine (restore.Loader).

type snapRegion struct {
	name string
	addr uint64
	data []byte
}

// memImage is the test image of n bytes for seed (memgen.Image).
func memImage(n int, seed uint64) []byte { return memgen.Image(n, seed) }

func testRegions() []snapRegion {
	return []snapRegion{
		{"text", 0x400000, memImage(5<<20+123, 1)},
		{"heap", 0x55d0_0000_0000, memImage(16<<20, 2)},
		{"stack", 0, memImage(100<<10+1, 3)},
		{"one", 0, []byte{42}},
	}
}

func writeSnapshot(t testing.TB, regions []snapRegion, chunk int) string {
	t.Helper()
	rs := make([]testutil.Region, len(regions))
	for i, r := range regions {
		rs[i] = testutil.Region{Name: r.name, Addr: r.addr, Data: r.data}
	}
	return testutil.WriteSnapshot(t, rs, format.CodecZstd, chunk)
}

func concatRegions(rs []snapRegion) []byte {
	var out []byte
	for _, r := range rs {
		out = append(out, r.data...)
	}
	return out
}

// nonZeroBytes is what decompressing every stored chunk once writes.
func nonZeroBytes(t testing.TB, snap string) int64 {
	f, err := format.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var n int64
	for i := 0; i < f.NumChunks(); i++ {
		if c := f.Chunk(i); c.Codec != format.CodecZero {
			n += int64(c.RawLen)
		}
	}
	return n
}

func newLoader(t testing.TB, snap string, backing restore.BackingKind, opts ...restore.Option) *restore.Loader {
	t.Helper()
	l, err := restore.NewLoader(context.Background(), snap, append([]restore.Option{restore.WithBacking(backing)}, opts...)...)
	if err != nil {
		t.Fatalf("NewLoader: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

var engineBackings = []struct {
	name    string
	kind    restore.BackingKind
	hugetlb bool
}{
	{"memfd-hugetlb", restore.BackingMemfdHugetlb, true},
	{"shmem", restore.BackingShmem, false},
}

// TestEngineTargets: 2 and 8 C targets at once on one loader, shared and
// private: every dump equals the image, every chunk was decompressed once.
func TestEngineTargets(t *testing.T) {
	regions := testRegions()
	want := concatRegions(regions)
	for _, bk := range engineBackings {
		for _, private := range []bool{false, true} {
			for _, n := range []int{2, 8} {
				t.Run(fmt.Sprintf("%s/private=%v/targets=%d", bk.name, private, n), func(t *testing.T) {
					requireUffd(t, bk.hugetlb)
					chunk := 2 << 20
					if !bk.hugetlb {
						chunk = 256 << 10
					}
					snap := writeSnapshot(t, regions, chunk)
					l := newLoader(t, snap, bk.kind)
					s, sock := listen(t, FromLoader(l), Options{})
					dir := t.TempDir()
					patterns := []string{"sequential", "random", "fraction:0.25"}
					var tgs []*target
					for i := 0; i < n; i++ {
						args := []string{"--dump", filepath.Join(dir, fmt.Sprint(i)), "--pattern", patterns[i%3],
							"--threads", fmt.Sprint(1 + i%2), "--seed", fmt.Sprint(i)}
						if private {
							args = append(args, "--private", "--write")
						}
						tgs = append(tgs, startTarget(t, sock, args...))
					}
					for i, tg := range tgs {
						if err := tg.wait(t, 120*time.Second); err != nil {
							t.Fatalf("target %d: %v\n%s", i, err, tg.stderr)
						}
						got, err := os.ReadFile(filepath.Join(dir, fmt.Sprint(i)))
						if err != nil {
							t.Fatal(err)
						}
						if !bytes.Equal(got, want) {
							t.Fatalf("target %d: dump differs from the image (%d vs %d bytes, first difference at %d)", i, len(got), len(want), firstDiff(got, want))
						}
					}
					waitFor(t, 5*time.Second, "targets gone", func() bool { return len(s.Targets()) == 0 })
					st := l.Stats()
					if st.Refills != 0 || st.Errors != 0 || st.Poisoned != 0 {
						t.Errorf("stats: %s", st.JSON())
					}
					if filled := st.FilledByFault + st.FilledByPrefill; filled != int64(st.Units) {
						t.Errorf("filled %d units, the snapshot has %d (each once): %s", filled, st.Units, st.JSON())
					}
					if nz := nonZeroBytes(t, snap); st.BytesDecoded != nz {
						t.Errorf("decoded %d bytes, the stored chunks hold %d: a chunk was decompressed twice or not at all", st.BytesDecoded, nz)
					}
					if st.Views != 0 {
						t.Errorf("%d views left after every target detached", st.Views)
					}
				})
			}
		}
	}
}

// TestEngineKilledTarget: a target SIGKILLed in the middle of its restore
// is freed; another one, attached at the same time, finishes with the
// right bytes; no fd stays open and no huge page stays allocated once the
// loader is closed.
func TestEngineKilledTarget(t *testing.T) {
	for _, bk := range engineBackings {
		t.Run(bk.name, func(t *testing.T) {
			requireUffd(t, bk.hugetlb)
			buildTarget(t)
			regions := []snapRegion{{"big", 0, memImage(96<<20, 9)}}
			snap := writeSnapshot(t, regions, 2<<20)
			hugeBefore := testutil.HugetlbMappedKB()
			fdsBefore := countFDs(t)
			l, err := restore.NewLoader(context.Background(), snap, restore.WithBacking(bk.kind), restore.WithWorkers(1))
			if err != nil {
				t.Fatal(err)
			}
			var mu sync.Mutex
			var ended []string
			s, sock := listen(t, FromLoader(l), Options{OnDetach: func(ti TargetInfo) { mu.Lock(); ended = append(ended, ti.Reason); mu.Unlock() }})
			dump := filepath.Join(t.TempDir(), "dump")
			survivor := startTarget(t, sock, "--wait", "--dump", dump, "--private")
			survivor.stderr.wait(t, "attached", 10*time.Second)
			victim := startTarget(t, sock, "--pattern", "random", "--threads", "2")
			victim.stderr.wait(t, "attached", 10*time.Second)
			time.Sleep(5 * time.Millisecond) // mid-restore: faults in flight
			victim.cmd.Process.Kill()
			victim.wait(t, 10*time.Second)
			if out := victim.stdout.String(); out != "" {
				t.Errorf("the victim finished before it was killed (%s): not a mid-restore kill", out)
			}
			waitFor(t, 10*time.Second, "victim freed", func() bool { return len(s.Targets()) == 1 })
			mu.Lock()
			if len(ended) != 1 || !strings.HasPrefix(ended[0], "hangup") {
				t.Errorf("ended = %v, want one hangup", ended)
			}
			mu.Unlock()
			survivor.stdin.Write([]byte("\n"))
			if err := survivor.wait(t, 60*time.Second); err != nil {
				t.Fatalf("survivor: %v\n%s", err, survivor.stderr)
			}
			got, _ := os.ReadFile(dump)
			if !bytes.Equal(got, regions[0].data) {
				t.Errorf("survivor's dump differs at %d", firstDiff(got, regions[0].data))
			}
			if err := s.Close(); err != nil {
				t.Error(err)
			}
			if err := l.Close(); err != nil {
				t.Error(err)
			}
			waitFor(t, 5*time.Second, "fds back", func() bool { return countFDs(t) == fdsBefore })
			if bk.hugetlb {
				// This process maps no huge pages any more (the pool's
				// free count is global: other test packages run at once).
				waitFor(t, 5*time.Second, "huge pages unmapped", func() bool { return testutil.HugetlbMappedKB() == hugeBefore })
			}
		})
	}
}

// TestEngineServerKilled: `the server` (a child process running a real
// loader) is SIGKILLed while a target is attached; the target, touching
// pages never filled, waits instead of reading zeros.
func TestEngineServerKilled(t *testing.T) {
	for _, bk := range engineBackings {
		t.Run(bk.name, func(t *testing.T) {
			requireUffd(t, bk.hugetlb)
			buildTarget(t)
			snap := writeSnapshot(t, []snapRegion{{"data", 0, memImage(8<<20, 4)}}, 2<<20)
			killServerUnderTarget(t, "UR_ATTACH_TEST_SNAP="+snap, "UR_ATTACH_TEST_BACKING="+bk.kind.String())
		})
	}
}
