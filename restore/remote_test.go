package restore

import (
	"context"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
)

// TestOpenRemoteSparse: Open of an http:// URL restores lazily in this
// process (its fault-handler helper opens the URL again, pinned to the same
// version); touching 10% of the units of a 64 MiB snapshot fetches under 20%
// of the file; the touched bytes and, after Wait, all bytes are the image's.
func TestOpenRemoteSparse(t *testing.T) {
	img := testImage(64<<20, 16)
	regions := []testRegion{{"mem", 0, img}}
	path := writeSnap(t, regions, format.CodecZstd, 256<<10)
	srv := httptest.NewServer(http.FileServer(http.Dir(filepath.Dir(path))))
	defer srv.Close()
	url := srv.URL + "/" + filepath.Base(path)
	r := openT(t, url, kernelOpts(t, BackingShmem, 64<<20)...)
	mem := r.Bytes()
	unit := 256 << 10
	units := len(img) / unit
	rng := rand.New(rand.NewPCG(16, 1))
	var sum byte
	for _, u := range rng.Perm(units)[:units/10] {
		off := u*unit + rng.IntN(unit)
		if mem[off] != img[off] {
			t.Fatalf("byte %d: got %#x, want %#x", off, mem[off], img[off])
		}
		sum += mem[off]
	}
	sinkMu.Lock()
	sinkByte += sum
	sinkMu.Unlock()
	st, err := r.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.Remote == nil {
		t.Fatal("no remote stats for a snapshot read from a URL")
	}
	frac := float64(st.Remote.BytesFetched) / float64(st.Remote.Size)
	t.Logf("touched %d of %d units: fetched %d of %d bytes (%.1f%%) in %d requests", units/10, units, st.Remote.BytesFetched, st.Remote.Size, 100*frac, st.Remote.Requests)
	if frac >= 0.2 || st.FilledByFault == 0 || st.FilledByFault > int64(units/10) {
		t.Errorf("a 10%% touch fetched %.1f%% of the file (filled by fault: %d units)", 100*frac, st.FilledByFault)
	}
	if err := r.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkRegions(t, mem, r.Layout(), regions)
}
