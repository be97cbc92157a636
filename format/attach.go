package format

import (
	"fmt"
	"slices"
)

// Attachments (SPEC.md, section 6): typed blobs stored with a snapshot, such
// as a virtual machine's device state next to its RAM. The section is
// non-critical: readers that predate it skip it and still read the memory.

const (
	secAttachments    = 6
	attachmentVersion = 1

	// MaxAttachments caps the number of attachments in a snapshot.
	MaxAttachments = 256
	// MaxAttachmentSize caps one attachment's data (the index, which holds
	// it, is read whole into memory).
	MaxAttachmentSize = 64 << 20
)

// Well-known attachment kinds.
const (
	// AttachQEMUDeviceState is a QEMU migration stream of the device state
	// only (RAM skipped with x-ignore-shared), as `uffdrestore vm
	// checkpoint` saves it.
	AttachQEMUDeviceState = "qemu-device-state"
)

// Attachment is one typed blob stored in the snapshot's index.
type Attachment struct {
	Kind string // what the data is, e.g. AttachQEMUDeviceState; unique within a snapshot
	Data []byte
}

func checkAttachments(as []Attachment) error {
	if len(as) > MaxAttachments {
		return fmt.Errorf("%w: %d attachments, limit %d", ErrTooLarge, len(as), MaxAttachments)
	}
	seen := make(map[string]bool, len(as))
	for _, a := range as {
		if a.Kind == "" {
			return fmt.Errorf("%w: attachment with an empty kind", ErrInvalid)
		}
		if err := checkName("attachment", a.Kind); err != nil {
			return err
		}
		if len(a.Data) > MaxAttachmentSize {
			return fmt.Errorf("%w: attachment %q is %d bytes, limit %d", ErrTooLarge, a.Kind, len(a.Data), MaxAttachmentSize)
		}
		if seen[a.Kind] {
			return fmt.Errorf("%w: attachment kind %q given twice", ErrInvalid, a.Kind)
		}
		seen[a.Kind] = true
	}
	return nil
}

// AddAttachment stores a typed blob with the snapshot, written with the
// index on Close. Kinds are unique within a snapshot.
func (w *Writer) AddAttachment(a Attachment) error {
	if w.closed {
		return ErrClosed
	}
	all := append(slices.Clone(w.attachments), Attachment{Kind: a.Kind, Data: slices.Clone(a.Data)})
	if err := checkAttachments(all); err != nil {
		return err
	}
	w.attachments = all
	return nil
}

// Attachments returns the snapshot's attachments (nil if it has none).
func (r *Reader) Attachments() []Attachment {
	if len(r.ix.attachments) == 0 {
		return nil
	}
	as := make([]Attachment, len(r.ix.attachments))
	for i, a := range r.ix.attachments {
		as[i] = Attachment{Kind: a.Kind, Data: slices.Clone(a.Data)}
	}
	return as
}

// Attachment returns the data of the attachment of the given kind.
func (r *Reader) Attachment(kind string) ([]byte, bool) {
	for _, a := range r.ix.attachments {
		if a.Kind == kind {
			return slices.Clone(a.Data), true
		}
	}
	return nil, false
}

func encodeAttachments(e *enc, as []Attachment) {
	end := e.section(secAttachments, 0)
	e.u16(attachmentVersion)
	e.u16(0)
	e.u32(uint32(len(as)))
	for _, a := range as {
		e.name(a.Kind)
		e.u16(0) // reserved
		e.u64(uint64(len(a.Data)))
		e.u32(Checksum(a.Data))
		e.b = append(e.b, a.Data...)
	}
	end()
}

func parseAttachments(b []byte, base int64) ([]Attachment, error) {
	d := &dec{b: b, base: base}
	v := d.u16("index.attachments.version")
	if d.err == nil && v != attachmentVersion {
		return nil, corrupt(ErrVersion, "index.attachments.version", base, -1,
			"attachment encoding version %d, this reader knows %d", v, attachmentVersion)
	}
	if r := d.u16("index.attachments.reserved"); d.err == nil && r != 0 {
		return nil, corrupt(ErrCorrupt, "index.attachments.reserved", base+2, -1, "must be zero, got %#x", r)
	}
	n := d.u32("index.attachments.count")
	if d.err != nil {
		return nil, d.err
	}
	if n > MaxAttachments || uint64(n)*16 > uint64(len(b)) {
		return nil, corrupt(ErrTooLarge, "index.attachments.count", base+4, -1, "%d attachments cannot fit in %d bytes", n, len(b))
	}
	as := make([]Attachment, 0, n)
	seen := make(map[string]bool, n)
	for i := uint32(0); i < n; i++ {
		f := fmt.Sprintf("index.attachments[%d]", i)
		at := d.off()
		a := Attachment{Kind: d.name(f + ".kind")}
		rat := d.off()
		if r := d.u16(f + ".reserved"); d.err == nil && r != 0 {
			return nil, corrupt(ErrCorrupt, f+".reserved", rat, -1, "must be zero, got %#x", r)
		}
		lat := d.off()
		ln := d.u64(f + ".length")
		crc := d.u32(f + ".crc")
		if d.err != nil {
			return nil, d.err
		}
		if a.Kind == "" {
			return nil, corrupt(ErrCorrupt, f+".kind", at, -1, "empty kind")
		}
		if seen[a.Kind] {
			return nil, corrupt(ErrCorrupt, f+".kind", at, -1, "kind %q appears twice", a.Kind)
		}
		seen[a.Kind] = true
		if ln > MaxAttachmentSize {
			return nil, corrupt(ErrTooLarge, f+".length", lat, -1, "%d bytes, limit %d", ln, MaxAttachmentSize)
		}
		dat := d.off()
		a.Data = d.bytes(ln, len(b), f+".data")
		if d.err != nil {
			return nil, d.err
		}
		if got := Checksum(a.Data); got != crc {
			return nil, corrupt(ErrChecksum, f+".data", dat, -1, "attachment %q: want %#08x (crc), got %#08x", a.Kind, crc, got)
		}
		a.Data = slices.Clone(a.Data)
		as = append(as, a)
	}
	if d.pos != len(b) {
		return nil, corrupt(ErrCorrupt, "index.attachments", d.off(), -1, "%d trailing bytes", len(b)-d.pos)
	}
	return as, nil
}
