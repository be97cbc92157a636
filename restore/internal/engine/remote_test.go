package engine

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/remote"
)

// TestOpenRemoteSparse: Open of an http:// URL restores lazily in this
// process (its fault-handler helper opens the URL again, pinned to the same
// version); touching 10% of the units of a 64 MiB snapshot fetches under 20%
// of the file; the touched bytes are the image's (TestOpenRemoteCache
// checks a whole restore byte for byte).
func TestOpenRemoteSparse(t *testing.T) {
	// 1024 copies of 64 KiB of memory-like bytes, each 4 KiB stamped with its
	// offset (cheaper to make than 64 MiB of testImage under -race).
	part := testImage(64<<10, 16)
	img := make([]byte, 64<<20)
	for off := 0; off < len(img); off += len(part) {
		copy(img[off:], part)
	}
	for off := 0; off < len(img); off += 4096 {
		binary.LittleEndian.PutUint64(img[off:], uint64(off)|1)
	}
	path := writeSnap(t, []testRegion{{"mem", 0, img}}, format.CodecS2, 256<<10)
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
}

// TestOpenRemoteCache: with a cache directory, a second full restore of the
// same snapshot fetches only the first 4 KiB (to check the version) and
// reads everything else from the cache.
func TestOpenRemoteCache(t *testing.T) {
	regions := []testRegion{{"mem", 0, testImage(2<<20+4096, 17)}}
	path := writeSnap(t, regions, format.CodecZstd, 256<<10)
	srv := httptest.NewServer(http.FileServer(http.Dir(filepath.Dir(path))))
	defer srv.Close()
	url := srv.URL + "/" + filepath.Base(path)
	opts := append(kernelOpts(t, BackingShmem, 4<<20), WithRemote(remote.Options{CacheDir: t.TempDir()}))
	for i := 0; i < 2; i++ {
		r, err := Open(context.Background(), url, opts...)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Wait(context.Background()); err != nil {
			t.Fatal(err)
		}
		checkRegions(t, r.Bytes(), r.Layout(), regions)
		st, err := r.Stats(context.Background())
		r.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("restore %d: %+v", i+1, *st.Remote)
		if i == 1 && (st.Remote.BytesFetched != 4096 || st.Remote.CacheBytes < st.BytesRead) {
			t.Errorf("second restore fetched %d bytes, read %d from the cache (%d stored bytes read); want 4096 and all", st.Remote.BytesFetched, st.Remote.CacheBytes, st.BytesRead)
		}
	}
}
