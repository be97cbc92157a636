package format

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
)

// Snapshot authentication (SPEC.md, "Section 5: authentication"): an
// optional index section holding the SHA-256 of every chunk's stored bytes
// and an HMAC-SHA256 of the whole index under a secret key. A reader given
// the key refuses a snapshot whose index was modified (or that is not
// signed) before reading any chunk, and a chunk whose stored bytes do not
// hash to their entry when it is read. CRC-32C alone cannot do this: anyone
// can forge a CRC.

const (
	secAuth          = 5
	authAlgHMACSHA   = 1
	authHeaderSize   = 8
	authMACSize      = sha256.Size
	authChunkHashLen = sha256.Size
)

// ErrAuth: a key was given and the snapshot is not signed, its index MAC
// does not match (modified, or signed with another key), or a chunk's
// stored bytes do not match their signed hash.
var ErrAuth = errors.New("format: snapshot authentication failed")

// Environment variables naming the key: the file holding it (its bytes, as
// they are) or the key itself in hex.
const (
	MACKeyFileEnv = "UFFDRESTORE_MAC_KEY_FILE"
	MACKeyEnv     = "UFFDRESTORE_MAC_KEY"
)

// MACKeyFromEnv returns the key named by UFFDRESTORE_MAC_KEY_FILE or
// UFFDRESTORE_MAC_KEY, or nil when neither is set.
func MACKeyFromEnv() ([]byte, error) {
	if p := os.Getenv(MACKeyFileEnv); p != "" {
		k, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("format: %s: %w", MACKeyFileEnv, err)
		}
		if len(k) < 16 {
			return nil, fmt.Errorf("format: %s: the key in %s is %d bytes, want at least 16", MACKeyFileEnv, p, len(k))
		}
		return k, nil
	}
	if h := os.Getenv(MACKeyEnv); h != "" {
		k, err := hex.DecodeString(strings.TrimSpace(h))
		if err != nil || len(k) < 16 {
			return nil, fmt.Errorf("format: %s must be at least 16 bytes in hex (e.g. from `openssl rand -hex 32`)", MACKeyEnv)
		}
		return k, nil
	}
	return nil, nil
}

// signIndex appends the authentication section to the encoded index ib
// (bumping its section count) and fills in its MAC.
func signIndex(ib []byte, hashes [][authChunkHashLen]byte, key []byte) ([]byte, error) {
	n := authHeaderSize + len(hashes)*authChunkHashLen + authMACSize
	if len(ib)+sectionHeaderSize+n > MaxIndexSize {
		return nil, fmt.Errorf("%w: signed index of %d bytes, limit %d", ErrTooLarge, len(ib)+sectionHeaderSize+n, MaxIndexSize)
	}
	le.PutUint32(ib[20:], le.Uint32(ib[20:])+1)
	ib = le.AppendUint16(ib, secAuth)
	ib = le.AppendUint16(ib, 0) // not critical: a reader without a key may skip it
	ib = le.AppendUint32(ib, uint32(n))
	ib = le.AppendUint16(ib, authAlgHMACSHA)
	ib = le.AppendUint16(ib, 0)
	ib = le.AppendUint32(ib, uint32(len(hashes)))
	for _, h := range hashes {
		ib = append(ib, h[:]...)
	}
	macAt := len(ib)
	ib = append(ib, make([]byte, authMACSize)...)
	copy(ib[macAt:], indexMAC(ib, macAt, key))
	return ib, nil
}

// indexMAC is HMAC-SHA256(key, ib with its MAC field at macAt zeroed).
func indexMAC(ib []byte, macAt int, key []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(ib[:macAt])
	m.Write(make([]byte, authMACSize))
	m.Write(ib[macAt+authMACSize:])
	return m.Sum(nil)
}

// findAuth returns the offset in ib of the authentication section's
// payload and its length, or -1. The index was validated by parseIndex.
func findAuth(ib []byte) (int, int) {
	nsec := int(le.Uint32(ib[20:]))
	pos := indexFixedSize
	for i := 0; i < nsec && pos+sectionHeaderSize <= len(ib); i++ {
		tag, n := le.Uint16(ib[pos:]), int(le.Uint32(ib[pos+4:]))
		if tag == secAuth {
			return pos + sectionHeaderSize, n
		}
		pos += sectionHeaderSize + n
	}
	return -1, 0
}

// Signed reports whether the snapshot carries an authentication section.
func (r *Reader) Signed() bool { return r.rawIndex != nil }

// Authenticate checks the index MAC under key and, if it matches, makes
// every Decoder check each chunk's stored bytes against its signed SHA-256
// (ErrAuth on a mismatch). Call it before using Decoders. A snapshot that
// is not signed, or whose MAC does not match, gives ErrAuth.
func (r *Reader) Authenticate(key []byte) error {
	if len(key) == 0 {
		return fmt.Errorf("%w: empty key", ErrInvalid)
	}
	if r.rawIndex == nil {
		return fmt.Errorf("%w: the snapshot is not signed (no authentication section) but a MAC key is set: sign it when creating it with the key in %s, or unset the key", ErrAuth, MACKeyFileEnv)
	}
	ib := r.rawIndex
	at, n := findAuth(ib)
	nc := r.ix.numChunks()
	if at < 0 || n != authHeaderSize+nc*authChunkHashLen+authMACSize {
		return fmt.Errorf("%w: the authentication section is %d bytes, want %d for %d chunks", ErrAuth, n, authHeaderSize+nc*authChunkHashLen+authMACSize, nc)
	}
	if alg := le.Uint16(ib[at:]); alg != authAlgHMACSHA || le.Uint16(ib[at+2:]) != 0 || int(le.Uint32(ib[at+4:])) != nc {
		return fmt.Errorf("%w: unknown authentication algorithm %d (or a chunk count other than the index's)", ErrAuth, alg)
	}
	macAt := at + n - authMACSize
	if !hmac.Equal(indexMAC(ib, macAt, key), ib[macAt:macAt+authMACSize]) {
		return fmt.Errorf("%w: the index MAC does not match: the snapshot was modified after it was signed, or signed with another key; refusing it before reading any chunk", ErrAuth)
	}
	hs := make([][authChunkHashLen]byte, nc)
	for i := range hs {
		copy(hs[i][:], ib[at+authHeaderSize+i*authChunkHashLen:])
	}
	r.hashes = hs
	return nil
}

// AuthenticateFromEnv authenticates r with the key from the environment
// (MACKeyFromEnv), if one is set.
func AuthenticateFromEnv(r *Reader) error {
	key, err := MACKeyFromEnv()
	if err != nil || key == nil {
		return err
	}
	return r.Authenticate(key)
}

// checkHash checks chunk i's stored bytes against its signed hash, if the
// reader was authenticated.
func (r *Reader) checkHash(i int, stored []byte) error {
	if r.hashes == nil {
		return nil
	}
	if sha256.Sum256(stored) != r.hashes[i] {
		return corrupt(ErrAuth, "stored bytes", int64(r.ix.chunk(i).Offset), i, "SHA-256 does not match the signed index: the chunk was modified")
	}
	return nil
}
