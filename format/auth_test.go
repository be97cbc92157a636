package format

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
)

var testKey = []byte("0123456789abcdef0123456789abcdef")

// signedSnap writes a signed (key != nil) snapshot of img: chunks raw,
// zstd and zero.
func signedSnap(t *testing.T, img []byte, key []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewWriter(&buf, WriterOptions{ChunkSize: 64 << 10, Codec: CodecZstd, MACKey: key})
	if err != nil {
		t.Fatal(err)
	}
	w.BeginRegion("img", 0, 3)
	w.Write(img)
	w.EndRegion()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func authImage() []byte {
	img := make([]byte, 512<<10+100)
	rand.New(rand.NewSource(9)).Read(img[:128<<10])                   // raw chunks
	copy(img[256<<10:], bytes.Repeat([]byte("compressible "), 10000)) // zstd chunks
	return img                                                        // and zero chunks
}

// tamperIndex changes a byte of the region name in the index and fixes the
// index and footer CRCs, so that only the MAC can tell.
func tamperIndex(t *testing.T, b []byte) []byte {
	t.Helper()
	b = bytes.Clone(b)
	ft := b[len(b)-FooterSize:]
	ioff, ilen := le.Uint64(ft), le.Uint64(ft[8:])
	ib := b[ioff : ioff+ilen]
	i := bytes.Index(ib, []byte("img"))
	if i < 0 {
		t.Fatal("no region name in the index")
	}
	ib[i+2] = 'h'
	le.PutUint32(ft[16:], Checksum(ib))
	le.PutUint32(ft[20:], Checksum(ft[:20]))
	return b
}

func decodeAll(r *Reader) ([]byte, error) {
	d := r.NewDecoder()
	defer d.Close()
	out := make([]byte, r.TotalSize())
	for c := 0; c < r.NumChunks(); c++ {
		off := r.ChunkOffset(c)
		if err := d.DecodeChunk(c, out[off:off+uint64(r.ChunkSize())]); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// TestAuth: a signed snapshot authenticates with its key and decodes; the
// wrong key, an unsigned snapshot, a tampered index (with valid CRCs) and a
// tampered chunk are ErrAuth; without a key the signature is ignored; a
// rewritten index drops it.
func TestAuth(t *testing.T) {
	img := authImage()
	b := signedSnap(t, img, testKey)
	r, err := NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	if !r.Signed() {
		t.Fatal("signed snapshot not Signed()")
	}
	if err := r.Authenticate(testKey); err != nil {
		t.Fatal(err)
	}
	if out, err := decodeAll(r); err != nil || !bytes.Equal(out[:len(img)], img) {
		t.Fatalf("decode of an authenticated snapshot: %v", err)
	}
	if err := r.Authenticate([]byte("another key, 32 bytes long......")); !errors.Is(err, ErrAuth) {
		t.Errorf("wrong key: %v, want ErrAuth", err)
	}

	un := signedSnap(t, img, nil)
	ru, err := NewReader(bytes.NewReader(un), int64(len(un)))
	if err != nil {
		t.Fatal(err)
	}
	if ru.Signed() || !errors.Is(ru.Authenticate(testKey), ErrAuth) {
		t.Error("an unsigned snapshot authenticated")
	}

	tb := tamperIndex(t, b)
	rt, err := NewReader(bytes.NewReader(tb), int64(len(tb)))
	if err != nil {
		t.Fatalf("tampered index with fixed CRCs should parse: %v", err)
	}
	if rt.Regions()[0].Name != "imh" {
		t.Fatal("tamper did not take")
	}
	if err := rt.Authenticate(testKey); !errors.Is(err, ErrAuth) {
		t.Errorf("tampered index: %v, want ErrAuth", err)
	}

	// A chunk's stored bytes changed: the signed hash is checked first.
	cb := bytes.Clone(b)
	c0 := r.Chunk(0)
	cb[c0.Offset+10] ^= 1
	rc, _ := NewReader(bytes.NewReader(cb), int64(len(cb)))
	if err := rc.Authenticate(testKey); err != nil {
		t.Fatal(err)
	}
	dst := make([]byte, r.ChunkSize())
	if err := rc.NewDecoder().DecodeChunk(0, dst); !errors.Is(err, ErrAuth) {
		t.Errorf("tampered chunk, authenticated: %v, want ErrAuth", err)
	}
	rc2, _ := NewReader(bytes.NewReader(cb), int64(len(cb)))
	if err := rc2.NewDecoder().DecodeChunk(0, dst); !errors.Is(err, ErrChecksum) {
		t.Errorf("tampered chunk, no key: %v, want ErrChecksum", err)
	}

	// A rewritten index (profile add) is no longer signed.
	p := filepath.Join(t.TempDir(), "s.snap")
	os.WriteFile(p, b, 0o600)
	if err := AppendProfile(p, Profile{Name: "x", Entries: []ProfileEntry{{Chunk: 1}}}); err != nil {
		t.Fatal(err)
	}
	f, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Signed() {
		t.Error("a rewritten index kept a signature it no longer matches")
	}
}

// TestAuthEnv: with UFFDRESTORE_MAC_KEY set, writers sign and Open refuses
// a tampered or unsigned snapshot.
func TestAuthEnv(t *testing.T) {
	dir := t.TempDir()
	img := authImage()
	unsigned := signedSnap(t, img, nil)
	t.Setenv(MACKeyEnv, "3031323334353637383961626364656630313233343536373839616263646566") // testKey
	signed := signedSnap(t, img, nil)
	for name, c := range map[string]struct {
		b  []byte
		ok bool
	}{"signed": {signed, true}, "tampered": {tamperIndex(t, signed), false}, "unsigned": {unsigned, false}} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, c.b, 0o600)
		f, err := Open(p)
		if c.ok != (err == nil) || (err != nil && !errors.Is(err, ErrAuth)) {
			t.Errorf("%s: %v", name, err)
		}
		if err == nil {
			f.Close()
		}
	}
	t.Setenv(MACKeyEnv, "zz")
	if _, err := Open(filepath.Join(dir, "signed")); err == nil {
		t.Error("a bad key in the environment was ignored")
	}
}
