// Package attach is the attach protocol (v1) of uffdrestore: how a target
// process in another address space maps a restored snapshot and hands its
// userfaultfd to the server that fills it. PROTOCOL.md at the top of the
// repository is the specification; this package is the Go side of it: the
// message types and codec, a Server built on a Backend (the restore engine),
// and a Client for Go targets.
//
// The package is pure Go: sockets and SCM_RIGHTS go through
// golang.org/x/sys/unix and net, userfaultfd calls through restore/uffd.
//
// The handshake is Firecracker's UFFD handshake reversed, because minor
// faults need the target to map the server's file:
//
//	server                                    target
//	  | <-------------- connect -------------- |
//	  | SO_PEERCRED uid check                   |
//	  | --- hello {layout} + backing fd -----> | mmap regions, userfaultfd,
//	  |                                         | UFFDIO_API, UFFDIO_REGISTER
//	  | <-- attach {mappings} + uffd --------- |
//	  | validate, serve faults                  |
//	  | --- ready ---------------------------> |
//	  | <-- stats / detach ------------------- |
//	  | --- stats / bye ---------------------> |
//
// The socket is the session: when it closes the server stops serving that
// target's userfaultfd. (A userfaultfd whose process exited does not report
// POLLHUP to the holder of a copy, so the socket is the only reliable sign
// that a target is gone.)
package attach

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"
)

// Version is the protocol version this package speaks.
const Version = 1

// Limits.
const (
	// MaxMsgSize is the largest message, in bytes, either side sends or accepts.
	MaxMsgSize = 64 << 10
	// MaxMappings is the most mappings one attach message may carry.
	MaxMappings = 1024
	// MaxRegions is the most regions a hello may carry (it must fit in
	// MaxMsgSize anyway).
	MaxRegions = 1024
	// maxFDs is how many fds a receive makes room for; more is "message too large".
	maxFDs = 4
)

// Message types.
const (
	TypeHello    = "hello"
	TypeAttach   = "attach"
	TypeReady    = "ready"
	TypeError    = "error"
	TypeStats    = "stats"
	TypeDetach   = "detach"
	TypeBye      = "bye"
	TypeShutdown = "shutdown"
)

// Backing kinds named in the hello.
const (
	BackingHugetlb = "hugetlb"
	BackingShmem   = "shmem"
)

// Errors. Validation failures are *ProtocolError values that match
// ErrInvalid with errors.Is.
var (
	// ErrTooLarge: a message (or its control data) did not fit the bounded
	// receive buffer; the kernel reported MSG_TRUNC or MSG_CTRUNC.
	ErrTooLarge = errors.New("attach: message too large")
	// ErrInvalid: a message is malformed or breaks a rule of the protocol.
	ErrInvalid = errors.New("attach: invalid message")
	// ErrRefused: the peer answered with an error message.
	ErrRefused = errors.New("attach: refused by peer")
	// ErrClosed: the peer closed the connection (an empty read).
	ErrClosed = errors.New("attach: connection closed by peer")
	// ErrInUse: a live server already listens on the socket path.
	ErrInUse = errors.New("attach: socket in use by a running server")
	// ErrUntrustedServer: the server runs as a uid the client does not
	// trust (not root, not the client's own, not the one it was told).
	ErrUntrustedServer = errors.New("attach: untrusted server")
)

// ProtocolError says which field of which message broke the protocol.
type ProtocolError struct {
	Msg   string // message type ("attach"), or "" before the type is known
	Field string // JSON path of the field ("mappings[2].offset"), or ""
	Text  string
}

func (e *ProtocolError) Error() string {
	s := "attach: "
	if e.Msg != "" {
		s += e.Msg + " message: "
	}
	if e.Field != "" {
		s += e.Field + ": "
	}
	return s + e.Text
}

// Is makes errors.Is(err, ErrInvalid) true.
func (e *ProtocolError) Is(target error) bool { return target == ErrInvalid }

func invalid(msg, field, format string, args ...any) *ProtocolError {
	return &ProtocolError{Msg: msg, Field: field, Text: fmt.Sprintf(format, args...)}
}

// RefusedError is an error message received from the peer.
type RefusedError struct{ Text string }

func (e *RefusedError) Error() string { return "attach: refused by peer: " + e.Text }

// Is makes errors.Is(err, ErrRefused) true.
func (e *RefusedError) Is(target error) bool { return target == ErrRefused }

// Region is one snapshot region as the hello describes it.
type Region struct {
	Name   string `json:"name"`
	Offset uint64 `json:"offset"` // offset in the backing file, page aligned
	Size   uint64 `json:"size"`   // bytes mapped: Length rounded up to page_size
	Length uint64 `json:"length"` // the region's true length in bytes
	Addr   uint64 `json:"addr"`   // original virtual address, 0 if unknown
	Prot   uint32 `json:"prot"`   // PROT_READ=1 | PROT_WRITE=2 | PROT_EXEC=4
}

// Hello is the server's first message, sent with the backing file's fd.
type Hello struct {
	Type      string   `json:"type"`
	Version   int      `json:"version"`
	Backing   string   `json:"backing"`
	PageSize  uint64   `json:"page_size"`
	ChunkSize uint64   `json:"chunk_size"`
	FileSize  uint64   `json:"file_size"`
	Snapshot  string   `json:"snapshot"`
	Regions   []Region `json:"regions"`
}

// Mapping is one range of the backing file a target mapped and registered.
type Mapping struct {
	Region           string `json:"region"`
	BaseHostVirtAddr uint64 `json:"base_host_virt_addr"`
	Size             uint64 `json:"size"`
	Offset           uint64 `json:"offset"`
	PageSize         uint64 `json:"page_size"`
	Private          bool   `json:"private"`
}

// Attach is the target's answer to the hello, sent with its userfaultfd.
type Attach struct {
	Type         string    `json:"type"`
	Version      int       `json:"version"`
	UffdFeatures uint64    `json:"uffd_features"`
	Mappings     []Mapping `json:"mappings"`
}

// Reply is every other message: ready, error, stats (request and reply),
// detach, bye and shutdown.
type Reply struct {
	Type  string          `json:"type"`
	Error string          `json:"error,omitempty"`
	Stats json.RawMessage `json:"stats,omitempty"`
}

// Envelope is what every message has: its type.
type Envelope struct {
	Type string `json:"type"`
}

var knownTypes = map[string]bool{
	TypeHello: true, TypeAttach: true, TypeReady: true, TypeError: true,
	TypeStats: true, TypeDetach: true, TypeBye: true, TypeShutdown: true,
}

// Encode marshals a message and checks it fits MaxMsgSize.
func Encode(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("attach: encode: %w", err)
	}
	if len(b) > MaxMsgSize {
		return nil, fmt.Errorf("%w: %d bytes encoded, the limit is %d", ErrTooLarge, len(b), MaxMsgSize)
	}
	return b, nil
}

// PeekType checks that raw is one UTF-8 JSON object with a known string
// "type" and returns it.
func PeekType(raw []byte) (string, error) {
	if len(raw) > MaxMsgSize {
		return "", fmt.Errorf("%w: %d bytes, the limit is %d", ErrTooLarge, len(raw), MaxMsgSize)
	}
	if !utf8.Valid(raw) {
		return "", invalid("", "", "message is not valid UTF-8")
	}
	var env Envelope
	if err := json.Unmarshal(raw, &env); err != nil {
		return "", invalid("", "", "malformed JSON: %v", err)
	}
	if err := checkDuplicates(raw); err != nil {
		return "", err
	}
	if env.Type == "" {
		return "", invalid("", "type", "missing (every message is a JSON object with a string \"type\")")
	}
	if !knownTypes[env.Type] {
		return "", invalid("", "type", "unknown message type %q", env.Type)
	}
	return env.Type, nil
}

// Decode checks raw is a message of type want and unmarshals it into v.
func Decode(raw []byte, want string, v any) error {
	typ, err := PeekType(raw)
	if err != nil {
		return err
	}
	if typ == TypeError && want != TypeError {
		var r Reply
		_ = json.Unmarshal(raw, &r)
		return &RefusedError{Text: r.Error}
	}
	if typ != want {
		return invalid(typ, "type", "expected a %q message, got %q", want, typ)
	}
	if err := json.Unmarshal(raw, v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			return invalid(typ, te.Field, "wrong JSON type: %s where the protocol has %s", te.Value, jsonKind(te.Type.Kind().String()))
		}
		return invalid(typ, "", "malformed JSON: %v", err)
	}
	return nil
}

// checkDuplicates rejects a message in which an object, at any depth, has
// two members of the same name: encoding/json would keep the last one, a
// parser elsewhere the first, and the two sides would disagree on what was
// sent (PROTOCOL.md §2). raw is known to be valid JSON.
func checkDuplicates(raw []byte) error {
	d := json.NewDecoder(bytes.NewReader(raw))
	d.UseNumber()
	return walkJSON(d, "")
}

// walkJSON reads one value from d, checking every object in it for
// duplicate member names; path names the value in errors.
func walkJSON(d *json.Decoder, path string) error {
	tok, err := d.Token()
	if err != nil {
		return invalid("", "", "malformed JSON: %v", err)
	}
	switch tok {
	case json.Delim('{'):
		seen := map[string]bool{}
		for d.More() {
			kt, err := d.Token()
			if err != nil {
				return invalid("", "", "malformed JSON: %v", err)
			}
			k, _ := kt.(string)
			f := k
			if path != "" {
				f = path + "." + k
			}
			if seen[k] {
				return invalid("", f, "member %q appears twice in one object (duplicate members are not allowed)", k)
			}
			seen[k] = true
			if err := walkJSON(d, f); err != nil {
				return err
			}
		}
		_, err = d.Token() // '}'
	case json.Delim('['):
		for i := 0; d.More(); i++ {
			if err := walkJSON(d, fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
		_, err = d.Token() // ']'
	}
	if err != nil {
		return invalid("", "", "malformed JSON: %v", err)
	}
	return nil
}

func jsonKind(k string) string {
	switch k {
	case "uint64", "uint32", "int", "int64":
		return "a non-negative integer"
	case "string":
		return "a string"
	case "bool":
		return "true or false"
	case "slice":
		return "an array"
	}
	return k
}

func isPow2(n uint64) bool { return n != 0 && n&(n-1) == 0 }

// Validate checks a hello the way a client should before mapping anything.
func (h *Hello) Validate() error {
	const m = TypeHello
	if h.Version != Version {
		return invalid(m, "version", "protocol version %d, this side speaks %d", h.Version, Version)
	}
	if h.Backing != BackingHugetlb && h.Backing != BackingShmem {
		return invalid(m, "backing", "%q is neither %q nor %q", h.Backing, BackingHugetlb, BackingShmem)
	}
	if !isPow2(h.PageSize) || h.PageSize < 4096 {
		return invalid(m, "page_size", "%d is not a power of two >= 4096", h.PageSize)
	}
	if !isPow2(h.ChunkSize) {
		return invalid(m, "chunk_size", "%d is not a power of two", h.ChunkSize)
	}
	if h.FileSize%h.PageSize != 0 {
		return invalid(m, "file_size", "%d is not a multiple of page_size %d", h.FileSize, h.PageSize)
	}
	if len(h.Regions) == 0 || len(h.Regions) > MaxRegions {
		return invalid(m, "regions", "%d regions, want 1..%d", len(h.Regions), MaxRegions)
	}
	for i, r := range h.Regions {
		f := func(name string) string { return fmt.Sprintf("regions[%d].%s", i, name) }
		switch {
		case r.Offset%h.PageSize != 0:
			return invalid(m, f("offset"), "%d is not a multiple of page_size %d", r.Offset, h.PageSize)
		case r.Size%h.PageSize != 0:
			return invalid(m, f("size"), "%d is not a multiple of page_size %d", r.Size, h.PageSize)
		case r.Length > r.Size || (r.Size > 0 && r.Size-r.Length >= h.PageSize):
			return invalid(m, f("length"), "%d does not round up to size %d (size is length rounded up to page_size)", r.Length, r.Size)
		case r.Offset > h.FileSize || r.Size > h.FileSize-r.Offset:
			return invalid(m, f("size"), "[%d, +%d) is outside the file (%d bytes)", r.Offset, r.Size, h.FileSize)
		case r.Prot&^7 != 0:
			return invalid(m, f("prot"), "%#x has bits other than PROT_READ|PROT_WRITE|PROT_EXEC", r.Prot)
		}
	}
	return nil
}

// Region returns the named region of the hello.
func (h *Hello) Region(name string) (Region, bool) {
	for _, r := range h.Regions {
		if r.Name == name {
			return r, true
		}
	}
	return Region{}, false
}

// Validate checks an attach message against the hello it answers: version,
// 1..MaxMappings mappings, each page aligned, inside the file (and inside
// its region when it names one), none overlapping another in the target's
// address space.
func (a *Attach) Validate(h *Hello) error {
	const m = TypeAttach
	if a.Version != Version {
		return invalid(m, "version", "protocol version %d, the server speaks %d", a.Version, Version)
	}
	if len(a.Mappings) == 0 || len(a.Mappings) > MaxMappings {
		return invalid(m, "mappings", "%d mappings, want 1..%d", len(a.Mappings), MaxMappings)
	}
	ps := h.PageSize
	for i, mp := range a.Mappings {
		f := func(name string) string { return fmt.Sprintf("mappings[%d].%s", i, name) }
		switch {
		case mp.PageSize != ps:
			return invalid(m, f("page_size"), "%d, the backing's page size is %d", mp.PageSize, ps)
		case mp.BaseHostVirtAddr == 0 || mp.BaseHostVirtAddr%ps != 0:
			return invalid(m, f("base_host_virt_addr"), "%#x is not a non-zero multiple of page_size %d", mp.BaseHostVirtAddr, ps)
		case mp.Size == 0 || mp.Size%ps != 0:
			return invalid(m, f("size"), "%d is not a positive multiple of page_size %d", mp.Size, ps)
		case mp.Offset%ps != 0:
			return invalid(m, f("offset"), "%d is not a multiple of page_size %d", mp.Offset, ps)
		case mp.Offset > h.FileSize || mp.Size > h.FileSize-mp.Offset:
			return invalid(m, f("size"), "file range [%d, +%d) is outside the file (%d bytes)", mp.Offset, mp.Size, h.FileSize)
		case mp.BaseHostVirtAddr+mp.Size < mp.BaseHostVirtAddr || mp.BaseHostVirtAddr+mp.Size > 1<<57:
			return invalid(m, f("size"), "address range [%#x, +%d) is outside a user address space", mp.BaseHostVirtAddr, mp.Size)
		}
		if mp.Region != "" {
			r, ok := h.Region(mp.Region)
			if !ok {
				return invalid(m, f("region"), "no region named %q in the hello", mp.Region)
			}
			if mp.Offset < r.Offset || mp.Offset+mp.Size > r.Offset+r.Size {
				return invalid(m, f("offset"), "file range [%d, +%d) is outside region %q [%d, +%d)", mp.Offset, mp.Size, r.Name, r.Offset, r.Size)
			}
		}
		for j := 0; j < i; j++ {
			o := a.Mappings[j]
			if mp.BaseHostVirtAddr < o.BaseHostVirtAddr+o.Size && o.BaseHostVirtAddr < mp.BaseHostVirtAddr+mp.Size {
				return invalid(m, f("base_host_virt_addr"), "[%#x, +%d) overlaps mappings[%d]", mp.BaseHostVirtAddr, mp.Size, j)
			}
		}
	}
	return nil
}
