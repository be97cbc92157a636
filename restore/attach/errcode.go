package attach

import (
	"errors"
	"syscall"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore/internal/engine"
)

// Error codes: the optional "code" member of an error message (and of a
// wait reply that reports a failed fill) says what kind of error the text
// describes, so the receiver can tell a corrupt snapshot from a full disk
// without parsing the text (PROTOCOL.md §3.4). ErrorCode gives the code of
// an error; a received error matches the code's sentinel with errors.Is
// (RefusedError, RemoteError). A receiver ignores a code it does not know.
const (
	CodeChecksum    = "checksum"         // a chunk failed its checksum (format.ErrChecksum)
	CodeCorrupt     = "corrupt"          // the snapshot's structure is invalid (format.ErrCorrupt)
	CodeTruncated   = "truncated"        // the snapshot file is cut short (format.ErrTruncated)
	CodeNotSnapshot = "not-snapshot"     // the file is not a snapshot (format.ErrNotSnapshot)
	CodeVersion     = "snapshot-version" // a snapshot format version this side cannot read (format.ErrVersion)
	CodeEmpty       = "empty-snapshot"   // the snapshot holds no memory (restore.ErrEmptySnapshot)
	CodeNoHugePages = "no-huge-pages"    // the huge page pool is too small (restore.ErrNoHugePages)
	CodeNoSpace     = "no-space"         // ENOSPC
	CodeNoMemory    = "no-memory"        // ENOMEM
	CodeIO          = "io"               // EIO
	CodeInvalid     = "invalid"          // a message broke the protocol (ErrInvalid)
	CodeTooLarge    = "too-large"        // a message was too large (ErrTooLarge)
)

// errorCodes maps codes to sentinels, most specific first (ErrorCode
// returns the first that matches).
var errorCodes = []struct {
	code string
	err  error
}{
	{CodeChecksum, format.ErrChecksum},
	{CodeTruncated, format.ErrTruncated},
	{CodeNotSnapshot, format.ErrNotSnapshot},
	{CodeVersion, format.ErrVersion},
	{CodeCorrupt, format.ErrCorrupt},
	{CodeEmpty, engine.ErrEmptySnapshot},
	{CodeNoHugePages, engine.ErrNoHugePages},
	{CodeNoSpace, syscall.ENOSPC},
	{CodeNoMemory, syscall.ENOMEM},
	{CodeIO, syscall.EIO},
	{CodeInvalid, ErrInvalid},
	{CodeTooLarge, ErrTooLarge},
}

// ErrorCode returns the code for err ("" when it has none): what a sender
// puts in an error message's "code" member.
func ErrorCode(err error) string {
	if err == nil {
		return ""
	}
	for _, c := range errorCodes {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	return ""
}

// codeIs reports whether code is the code of target.
func codeIs(code string, target error) bool {
	if code == "" {
		return false
	}
	for _, c := range errorCodes {
		if c.code == code {
			return c.err == target
		}
	}
	return false
}

// RemoteError is an error the peer reported without ending the session:
// a wait reply's "error" (units that failed to fill). errors.Is matches
// the sentinel of its code.
type RemoteError struct {
	Text string
	Code string
}

func (e *RemoteError) Error() string { return e.Text }

// Is makes errors.Is(err, S) true for the sentinel S of the code.
func (e *RemoteError) Is(target error) bool { return codeIs(e.Code, target) }
