package engine

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// TestAdoptLoaderKeepsPresentUnits: a loader adopting a backing that holds
// part of the snapshot serves the present units as they are (a shared
// target's write stays), fills the absent ones, and fills only the missing
// pages of a unit that is partly present.
func TestAdoptLoaderKeepsPresentUnits(t *testing.T) {
	for _, kind := range []BackingKind{BackingShmem, BackingMemfdHugetlb} {
		t.Run(kind.String(), func(t *testing.T) {
			if kind.hugetlb() {
				testutil.RequireHugePages(t, 8)
			}
			img := testImage(8<<20, 7)
			snap := writeSnap(t, []testRegion{{name: "data", data: img}}, format.CodecZstd, 64<<10)
			ctx := context.Background()
			l, err := NewLoader(ctx, snap, WithBacking(kind), WithMode(ModeEager))
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			fd := l.BackingFile().Fd()
			unit := int64(max(l.e.unitSize, 1))
			ps := int64(l.e.b.pageSize)
			mem := l.e.alias.Bytes()
			// Units decoded in full (no zero chunk: a zero chunk's pages
			// are only allocated, and shmem does not count those as in
			// the page cache until written; such units are filled again,
			// which writes nothing).
			var whole []int64
			for u := 0; u < l.e.nUnits && len(whole) < 3; u++ {
				if _, _, ok := l.e.unitChunks(uint32(u)); ok || kind.hugetlb() {
					whole = append(whole, int64(u))
				}
			}
			if len(whole) < 3 {
				t.Fatalf("the test image has %d units without zero chunks, want 3", len(whole))
			}
			wrote, punched, part := whole[0], whole[1], whole[2]
			// A shared target's write into one unit, a unit punched out
			// whole and, for shmem, a unit missing one page.
			copy(mem[wrote*unit+100:], "written by a target")
			if err := uffd.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, punched*unit, unit); err != nil {
				t.Fatal(err)
			}
			partial := unit > ps
			if partial {
				copy(mem[part*unit+ps+7:], "kept in a partial unit")
				if err := uffd.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, part*unit, ps); err != nil {
					t.Fatal(err)
				}
			}
			l2, info, err := AdoptLoader(ctx, snap, fd, WithMode(ModeLazy))
			if err != nil {
				t.Fatal(err)
			}
			defer l2.Close()
			if n := l2.e.nUnits; info.Absent+info.Partial+info.Present != n || info.Present == 0 {
				t.Fatalf("adopt found %+v for %d units", info, n)
			}
			if st := l2.e.state[wrote].Load(); st != stPresent {
				t.Fatalf("unit %d (written, all pages present): state %d, want present", wrote, st)
			}
			if st := l2.e.state[punched].Load(); st != stAbsent || l2.e.partial[punched].Load() {
				t.Fatalf("unit %d (punched): state %d partial %v, want absent", punched, st, l2.e.partial[punched].Load())
			}
			if partial && (l2.e.state[part].Load() != stAbsent || !l2.e.partial[part].Load()) {
				t.Fatalf("unit %d (one page punched): state %d partial %v, want absent and partial", part, l2.e.state[part].Load(), l2.e.partial[part].Load())
			}
			if err := l2.Wait(ctx); err != nil {
				t.Fatal(err)
			}
			got := l2.e.alias.Bytes()
			want := append([]byte(nil), img...)
			copy(want[wrote*unit+100:], "written by a target")
			if partial {
				copy(want[part*unit+ps+7:], "kept in a partial unit")
			}
			if string(got[:len(want)]) != string(want) {
				for i := range want {
					if got[i] != want[i] {
						t.Fatalf("after adopting and filling, byte %d (unit %d) is %#x, want %#x", i, int64(i)/unit, got[i], want[i])
					}
				}
			}
		})
	}
}

// TestAdoptLoaderRefusesForeignBacking: a backing of another size, an
// unsealed memfd or a regular file are refused with ErrForeignBacking.
func TestAdoptLoaderRefusesForeignBacking(t *testing.T) {
	snap := writeSnap(t, []testRegion{{name: "data", data: testImage(1<<20, 3)}}, format.CodecZstd, 64<<10)
	mk := func(size int64, seal bool) int {
		f, err := uffd.MemfdCreate("foreign", false, 0)
		if err != nil {
			t.Fatal(err)
		}
		fd := f.Release() // closed below
		if err := uffd.Ftruncate(fd, size); err != nil {
			t.Fatal(err)
		}
		if seal {
			if err := uffd.AddSeals(fd, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
				t.Fatal(err)
			}
		}
		return fd
	}
	f, err := os.CreateTemp(t.TempDir(), "plain")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Truncate(1 << 20)
	for name, fd := range map[string]int{"size": mk(2<<20, true), "unsealed": mk(1<<20, false), "regular file": int(f.Fd())} {
		_, _, err := AdoptLoader(context.Background(), snap, fd)
		if !errors.Is(err, ErrForeignBacking) {
			t.Errorf("%s: AdoptLoader = %v, want ErrForeignBacking", name, err)
		}
		if name != "regular file" {
			unix.Close(fd)
		}
	}
	// The right one is adopted.
	fd := mk(1<<20, true)
	defer unix.Close(fd)
	l, _, err := AdoptLoader(context.Background(), snap, fd)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
}

// TestAdoptLoaderFillJournal: a unit the dead server was in the middle of
// filling (marked in the fill journal, every page present but half
// written) is punched and filled again by the adopting loader, not served.
func TestAdoptLoaderFillJournal(t *testing.T) {
	img := testImage(4<<20, 9)
	snap := writeSnap(t, []testRegion{{name: "data", data: img}}, format.CodecZstd, 64<<10)
	journal := filepath.Join(t.TempDir(), "fills")
	ctx := context.Background()
	l, err := NewLoader(ctx, snap, WithBacking(BackingShmem), WithMode(ModeEager), WithFillJournal(journal))
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.FcntlInt(uintptr(l.BackingFile().Fd()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	for u, w := range l.e.journal.w {
		if w != jIdle {
			t.Fatalf("after the fill, unit %d is marked %d in the journal", u, w)
		}
	}
	// As if the server died decoding unit 7: its first half written, the
	// rest garbage (every page present), the mark still set.
	const u = 7
	unit := l.e.unitSize
	bad := l.e.alias.Bytes()[u*unit+unit/2 : (u+1)*unit]
	for i := range bad {
		bad[i] = 0xee
	}
	l.e.journalMark(u)
	l.Close()

	l2, info, err := AdoptLoader(ctx, snap, fd, WithFillJournal(journal))
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	if info.Punched != 1 || l2.e.state[u].Load() == stPresent {
		t.Fatalf("adopt: %+v, unit %d state %d: want it punched and absent", info, u, l2.e.state[u].Load())
	}
	if err := l2.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if got := l2.e.alias.Bytes()[:len(img)]; !bytes.Equal(got, img) {
		t.Fatal("after adopting and filling, the backing differs from the snapshot")
	}
}
