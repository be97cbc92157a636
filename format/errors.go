package format

import (
	"errors"
	"fmt"
	"io"
	"strings"
)

// Errors returned by this package. Reader errors that have a location are
// wrapped in a *CorruptError whose Unwrap returns one of these, so
// errors.Is(err, ErrChecksum) works on them.
var (
	// ErrNotSnapshot: the header or footer magic does not match; the input is
	// not a uffdrestore snapshot (or its ends were cut off / overwritten).
	ErrNotSnapshot = errors.New("format: not a uffdrestore snapshot")
	// ErrVersion: the file uses a format version or a critical feature this
	// reader does not know. Use a newer uffdrestore.
	ErrVersion = errors.New("format: unsupported snapshot version")
	// ErrTruncated: the file ends before a structure it declares. A
	// CorruptError wrapping it also matches io.ErrUnexpectedEOF.
	ErrTruncated = errors.New("format: snapshot truncated")
	// ErrCorrupt: a field holds an impossible or self-inconsistent value.
	ErrCorrupt = errors.New("format: snapshot corrupt")
	// ErrChecksum: a CRC-32C (header, footer, index or chunk) does not match.
	ErrChecksum = errors.New("format: checksum mismatch")
	// ErrTooLarge: a count or length exceeds a limit of this implementation.
	ErrTooLarge = errors.New("format: value exceeds limit")
	// ErrInvalid: a caller passed an invalid argument (option, chunk index,
	// short destination buffer, writer call out of order).
	ErrInvalid = errors.New("format: invalid argument")
	// ErrClosed: the Writer or Decoder was already closed.
	ErrClosed = errors.New("format: use of closed writer or decoder")
)

// CorruptError describes a problem found in a snapshot and where it is.
type CorruptError struct {
	Field  string // structure field, e.g. "index.chunks[3].raw_len"; "" if n/a
	Offset int64  // file offset of the field or chunk data; -1 if n/a
	Chunk  int    // chunk index, -1 if n/a
	Err    error  // one of the sentinel errors above
	Msg    string // details, e.g. "want 0x1234, got 0x5678"
}

func (e *CorruptError) Error() string {
	var b strings.Builder
	b.WriteString("format: ")
	sep := ""
	if e.Chunk >= 0 {
		fmt.Fprintf(&b, "chunk %d", e.Chunk)
		sep = " "
	}
	if e.Field != "" {
		b.WriteString(sep)
		if e.Chunk >= 0 {
			fmt.Fprintf(&b, "(%s)", e.Field)
		} else {
			b.WriteString(e.Field)
		}
		sep = " "
	}
	if e.Offset >= 0 {
		fmt.Fprintf(&b, "%sat offset %#x", sep, e.Offset)
	}
	b.WriteString(": ")
	what := "error"
	if e.Err != nil {
		what = strings.TrimPrefix(e.Err.Error(), "format: ")
	}
	b.WriteString(what)
	if e.Msg != "" {
		b.WriteString(" (")
		b.WriteString(e.Msg)
		b.WriteString(")")
	}
	return b.String()
}

// Unwrap returns the sentinel error.
func (e *CorruptError) Unwrap() error { return e.Err }

// Is makes a truncation error also match io.ErrUnexpectedEOF.
func (e *CorruptError) Is(target error) bool {
	return target == io.ErrUnexpectedEOF && e.Err == ErrTruncated
}

func corrupt(sentinel error, field string, off int64, chunk int, format string, args ...any) *CorruptError {
	msg := format
	if len(args) > 0 {
		msg = fmt.Sprintf(format, args...)
	}
	return &CorruptError{Field: field, Offset: off, Chunk: chunk, Err: sentinel, Msg: msg}
}
