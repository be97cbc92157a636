package remote_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/remote"
)

// TestNginx: against a real server (Debian's nginx on loopback): ranged
// reads are byte-exact, format.Open of the URL gives the same snapshot as
// the local file (every chunk decodes to the same bytes), a snapshot
// renamed over by a new version is refused (nginx answers If-Match with
// 412), a 404 and a body that is not a snapshot are named errors.
func TestNginx(t *testing.T) {
	root := t.TempDir()
	img := make([]byte, 2<<20+555)
	rand.New(rand.NewSource(5)).Read(img[:1<<20]) // half random, half zero
	snap := testutil.WriteSnapshot(t, []testutil.Region{{Name: "img", Data: img}}, format.CodecZstd, 64<<10)
	raw, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "app.snap"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, "text.snap"), bytes.Repeat([]byte("hello "), 1000), 0o644)
	ng := testutil.StartNginx(t, root)
	url := ng.URL + "/app.snap"

	r, err := remote.Open(context.Background(), url, remote.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	rng := rand.New(rand.NewSource(6))
	for i := 0; i < 100; i++ {
		off := rng.Int63n(int64(len(raw)))
		n := min(1+rng.Int63n(100000), int64(len(raw))-off)
		p := make([]byte, n)
		if _, err := r.ReadAt(p, off); err != nil || !bytes.Equal(p, raw[off:off+n]) {
			t.Fatalf("ReadAt(%d, %d): %v (or wrong bytes)", n, off, err)
		}
	}

	rf, err := format.Open(url)
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	lf, err := format.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	if rf.NumChunks() != lf.NumChunks() || rf.FileSize() != lf.FileSize() || rf.Remote() == nil {
		t.Fatalf("remote: %d chunks, %d bytes; local: %d chunks, %d bytes", rf.NumChunks(), rf.FileSize(), lf.NumChunks(), lf.FileSize())
	}
	rd, ld := rf.NewDecoder(), lf.NewDecoder()
	defer rd.Close()
	defer ld.Close()
	a, b := make([]byte, rf.ChunkSize()), make([]byte, lf.ChunkSize())
	for c := 0; c < rf.NumChunks(); c++ {
		if err := rd.DecodeChunk(c, a); err != nil {
			t.Fatalf("chunk %d over HTTP: %v", c, err)
		}
		ld.DecodeChunk(c, b)
		if !bytes.Equal(a, b) {
			t.Fatalf("chunk %d differs over HTTP", c)
		}
	}

	// A new version renamed over the old one, as a deploy does.
	other := bytes.Clone(raw)
	other[len(other)/2] ^= 1
	tmp := filepath.Join(root, ".new")
	os.WriteFile(tmp, other, 0o644)
	later := time.Now().Add(time.Hour)
	os.Chtimes(tmp, later, later)
	if err := os.Rename(tmp, filepath.Join(root, "app.snap")); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ReadAt(make([]byte, 1000), 5000); !errors.Is(err, remote.ErrChanged) {
		t.Fatalf("read after the replacement: %v, want ErrChanged", err)
	}
	if err := rd.DecodeChunk(1, a); !errors.Is(err, remote.ErrChanged) {
		t.Fatalf("decode after the replacement: %v, want ErrChanged", err)
	}

	if _, err := format.Open(ng.URL + "/missing.snap"); !errors.Is(err, remote.ErrNotFound) {
		t.Errorf("404: %v, want ErrNotFound", err)
	}
	if _, err := format.Open(ng.URL + "/text.snap"); !errors.Is(err, format.ErrNotSnapshot) {
		t.Errorf("text body: %v, want format.ErrNotSnapshot", err)
	}
}
