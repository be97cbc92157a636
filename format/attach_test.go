package format

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// attachSnap builds a small snapshot carrying the given attachments.
func attachSnap(t testing.TB, opts WriterOptions, as ...Attachment) ([]byte, []byte) {
	t.Helper()
	img := testImage(5*MinChunkSize+100, 21)
	var buf bytes.Buffer
	opts.ChunkSize, opts.Workers, opts.Metadata.Created = MinChunkSize, 2, fixedTime
	w, err := NewWriter(&buf, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.BeginRegion("mem", 0, ProtRead|ProtWrite); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(img); err != nil {
		t.Fatal(err)
	}
	for _, a := range as {
		if err := w.AddAttachment(a); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), img
}

func devState() []byte {
	b := make([]byte, 300<<10)
	for i := range b {
		b[i] = byte(i*7 + i>>9)
	}
	return b
}

// attachmentDataOffset returns the file offset of the first byte of the
// data of attachment kind in snapshot b.
func attachmentDataOffset(t testing.TB, b []byte, kind string) int {
	t.Helper()
	fo := len(b) - FooterSize
	ioff := int(le.Uint64(b[fo:]))
	i := bytes.Index(b[ioff:fo], []byte(kind))
	if i < 0 {
		t.Fatalf("attachment %q not in the index", kind)
	}
	return ioff + i + len(kind) + 2 + 8 + 4
}

func TestAttachmentRoundTrip(t *testing.T) {
	ds := devState()
	snap, img := attachSnap(t, WriterOptions{}, Attachment{Kind: AttachQEMUDeviceState, Data: ds}, Attachment{Kind: "note", Data: []byte("x")})
	check := func(t *testing.T, snap []byte) {
		t.Helper()
		r, err := NewReader(bytes.NewReader(snap), int64(len(snap)))
		if err != nil {
			t.Fatal(err)
		}
		got, ok := r.Attachment(AttachQEMUDeviceState)
		if !ok || !bytes.Equal(got, ds) {
			t.Fatalf("device state: ok=%v, %d bytes, equal=%v", ok, len(got), bytes.Equal(got, ds))
		}
		as := r.Attachments()
		if len(as) != 2 || as[1].Kind != "note" || string(as[1].Data) != "x" {
			t.Fatalf("Attachments() = %d entries", len(as))
		}
		if _, ok := r.Attachment("missing"); ok {
			t.Fatal("Attachment(missing) found")
		}
		regs, err := readAll(snap)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(regs[0], img) {
			t.Fatal("memory differs")
		}
	}
	t.Run("written", func(t *testing.T) { check(t, snap) })
	t.Run("rewrite", func(t *testing.T) {
		r, err := NewReader(bytes.NewReader(snap), int64(len(snap)))
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if _, err := Rewrite(context.Background(), &buf, r, RewriteOptions{Order: []uint32{3, 1}}); err != nil {
			t.Fatal(err)
		}
		check(t, buf.Bytes())
	})
	t.Run("append-profile", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "a.snap")
		if err := os.WriteFile(p, snap, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := AppendProfile(p, Profile{Name: "boot", Entries: []ProfileEntry{{Chunk: 1}}}); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		check(t, b)
	})
	t.Run("signed", func(t *testing.T) {
		key := []byte("attachment test key, 32 bytes..")
		sb, _ := attachSnap(t, WriterOptions{MACKey: key}, Attachment{Kind: AttachQEMUDeviceState, Data: ds}, Attachment{Kind: "note", Data: []byte("x")})
		check(t, sb)
		r, err := NewReader(bytes.NewReader(sb), int64(len(sb)))
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Authenticate(key); err != nil {
			t.Fatal(err)
		}
		// The MAC covers the attachment: change a byte and fix both CRCs.
		off := attachmentDataOffset(t, sb, AttachQEMUDeviceState)
		sb = bytes.Clone(sb)
		sb[off+10] ^= 1
		le.PutUint32(sb[off-4:], Checksum(sb[off:off+len(ds)]))
		fixIndexCRC(sb)
		r, err = NewReader(bytes.NewReader(sb), int64(len(sb)))
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Authenticate(key); !errors.Is(err, ErrAuth) {
			t.Fatalf("tampered device state authenticated: %v", err)
		}
	})
}

func TestAttachmentCorrupt(t *testing.T) {
	ds := devState()
	snap, _ := attachSnap(t, WriterOptions{}, Attachment{Kind: AttachQEMUDeviceState, Data: ds})
	off := attachmentDataOffset(t, snap, AttachQEMUDeviceState)
	open := func(b []byte) error {
		_, err := NewReader(bytes.NewReader(b), int64(len(b)))
		return err
	}
	// A flipped byte: the index CRC catches it.
	b := bytes.Clone(snap)
	b[off+1000] ^= 0x40
	if err := open(b); !errors.Is(err, ErrChecksum) {
		t.Fatalf("flipped device-state byte: %v, want ErrChecksum", err)
	}
	// With the index CRC fixed up, the attachment's own CRC catches it.
	fixIndexCRC(b)
	err := open(b)
	var ce *CorruptError
	if !errors.Is(err, ErrChecksum) || !errors.As(err, &ce) || ce.Field != "index.attachments[0].data" {
		t.Fatalf("flipped device-state byte (index CRC fixed): %v, want ErrChecksum on index.attachments[0].data", err)
	}
	// A length running past the section.
	b = bytes.Clone(snap)
	le.PutUint64(b[off-12:], uint64(len(ds))+1)
	fixIndexCRC(b)
	if err := open(b); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("attachment length past the section: %v, want ErrCorrupt", err)
	}
	// A length over the limit.
	le.PutUint64(b[off-12:], MaxAttachmentSize+1)
	fixIndexCRC(b)
	if err := open(b); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("attachment length over the limit: %v, want ErrTooLarge", err)
	}
	// A newer attachment encoding: ErrVersion, not a misread.
	b = bytes.Clone(snap)
	ko := off - 14 - len(AttachQEMUDeviceState)
	secPayload := ko - 2 - 8 // name_len u16 before the kind; version u16, reserved u16, count u32
	if le.Uint16(b[secPayload:]) != attachmentVersion || le.Uint16(b[secPayload-8:]) != secAttachments {
		t.Fatalf("layout assumption wrong: version %d tag %d", le.Uint16(b[secPayload:]), le.Uint16(b[secPayload-8:]))
	}
	// The section is non-critical, so that readers that do not know it
	// skip it (SPEC.md versioning rules).
	if fl := le.Uint16(b[secPayload-6:]); fl&secFlagCritical != 0 {
		t.Fatalf("attachments section flags %#x: must be non-critical", fl)
	}
	le.PutUint16(b[secPayload:], attachmentVersion+1)
	fixIndexCRC(b)
	if err := open(b); !errors.Is(err, ErrVersion) {
		t.Fatalf("attachment version %d: %v, want ErrVersion", attachmentVersion+1, err)
	}
	// Duplicate kinds.
	two, _ := attachSnap(t, WriterOptions{}, Attachment{Kind: "aaaa", Data: []byte("1")}, Attachment{Kind: "aaab", Data: []byte("1")})
	i := bytes.LastIndex(two, []byte("aaab"))
	two[i+3] = 'a'
	fixIndexCRC(two)
	if err := open(two); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "twice") {
		t.Fatalf("duplicate attachment kind: %v, want ErrCorrupt", err)
	}
}

// A snapshot written before attachments existed (the golden files) reads as
// one without any.
func TestAttachmentOldSnapshot(t *testing.T) {
	b := readTestdata(t, "golden-zstd.snap")
	r, err := NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	if as := r.Attachments(); as != nil {
		t.Fatalf("old snapshot has %d attachments", len(as))
	}
	if _, ok := r.Attachment(AttachQEMUDeviceState); ok {
		t.Fatal("old snapshot has device state")
	}
	// Without attachments the writer writes no (empty) section 6.
	plain, _ := attachSnap(t, WriterOptions{})
	rp, err := NewReader(bytes.NewReader(plain), int64(len(plain)))
	if err != nil {
		t.Fatal(err)
	}
	if nsec := le.Uint32(plain[rp.indexOff+20:]); nsec != 3 {
		t.Fatalf("snapshot without attachments or profiles has %d index sections, want 3", nsec)
	}
}

func TestAttachmentWriterMisuse(t *testing.T) {
	w, err := NewWriter(&bytes.Buffer{}, WriterOptions{ChunkSize: MinChunkSize})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Abort()
	if err := w.AddAttachment(Attachment{Kind: "", Data: []byte("x")}); !errors.Is(err, ErrInvalid) {
		t.Errorf("empty kind: %v", err)
	}
	if err := w.AddAttachment(Attachment{Kind: "k", Data: make([]byte, MaxAttachmentSize+1)}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("too large: %v", err)
	}
	if err := w.AddAttachment(Attachment{Kind: "k", Data: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	if err := w.AddAttachment(Attachment{Kind: "k", Data: []byte("y")}); !errors.Is(err, ErrInvalid) {
		t.Errorf("duplicate kind: %v", err)
	}
}
