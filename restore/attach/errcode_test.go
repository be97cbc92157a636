package attach

import (
	"errors"
	"fmt"
	"syscall"
	"testing"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore"
)

// TestErrorCodes: an error's code survives the wire: the sender's
// ErrorCode, through an error message decoded by the receiver, matches the
// same sentinel with errors.Is (and ErrRefused still).
func TestErrorCodes(t *testing.T) {
	for _, sentinel := range []error{format.ErrChecksum, format.ErrCorrupt, format.ErrTruncated, format.ErrNotSnapshot,
		format.ErrVersion, restore.ErrEmptySnapshot, restore.ErrNoHugePages, syscall.ENOSPC, syscall.ENOMEM, syscall.EIO, ErrInvalid, ErrTooLarge} {
		err := fmt.Errorf("restore: unit 3: %w", sentinel)
		code := ErrorCode(err)
		if code == "" {
			t.Fatalf("%v has no code", err)
		}
		raw, encErr := Encode(Reply{Type: TypeError, Error: err.Error(), Code: code})
		if encErr != nil {
			t.Fatal(encErr)
		}
		var r Reply
		got := Decode(raw, TypeReady, &r)
		if !errors.Is(got, sentinel) || !errors.Is(got, ErrRefused) {
			t.Errorf("code %q: decoded %v does not match %v and ErrRefused", code, got, sentinel)
		}
		for _, other := range []error{format.ErrChecksum, syscall.ENOSPC} {
			if other != sentinel && errors.Is(got, other) {
				t.Errorf("code %q also matches %v", code, other)
			}
		}
		if re := (&RemoteError{Text: err.Error(), Code: code}); !errors.Is(re, sentinel) {
			t.Errorf("RemoteError with code %q does not match %v", code, sentinel)
		}
	}
	// A checksum error wraps corruption too: the specific code wins.
	if c := ErrorCode(fmt.Errorf("%w: %w", format.ErrCorrupt, format.ErrChecksum)); c != CodeChecksum {
		t.Errorf("checksum+corrupt: code %q, want %q", c, CodeChecksum)
	}
	if c := ErrorCode(errors.New("no kind")); c != "" {
		t.Errorf("an error of no known kind has code %q", c)
	}
	if errors.Is(&RefusedError{Text: "x", Code: "no-such-code"}, format.ErrChecksum) {
		t.Error("an unknown code matched a sentinel")
	}
}
