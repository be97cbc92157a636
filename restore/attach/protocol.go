// Package attach is the attach protocol (v2) of uffdrestore: how a target
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
//	  | --- hello {layout} + backing fd -----> |
//	  | --- regions {batch} ...  ------------> | mmap regions, userfaultfd,
//	  |                                         | UFFDIO_API, UFFDIO_REGISTER
//	  | <-- attach {count} + uffd ------------ |
//	  | <-- mappings {batch} ... ------------- |
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
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"unicode/utf8"

	"github.com/uffdrestore/uffdrestore/restore/internal/engine"
)

// Version is the protocol version this package speaks. Version 2 carries
// the regions and mappings in batches after the hello and the attach (so
// their number is not bounded by one message), and names a mapping's
// region by its index, since region names need not be unique.
const Version = 2

// Limits.
const (
	// MaxMsgSize is the largest message, in bytes, either side sends or accepts.
	MaxMsgSize = 64 << 10
	// MaxMappings is the most mappings one attach may announce (sent in
	// batches of "mappings" messages).
	MaxMappings = 1 << 16
	// MaxRegions is the most regions a hello may announce (sent in batches
	// of "regions" messages). A target maps each region once, so in
	// practice vm.max_map_count (65530 by default) is the bound: see
	// CheckLayout.
	MaxRegions = 1 << 16
	// NoRegion is Mapping.Region for a mapping of any part of the file.
	NoRegion = -1
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
	TypeRegions  = "regions"  // server → target after the hello: a batch of regions
	TypeMappings = "mappings" // target → server after the attach: a batch of mappings
	// TypeReattach is an attach by a target that is attached already, to a
	// server that died: its existing userfaultfd and mappings, and its
	// backing fd (PROTOCOL.md §5.1). Sent only to a server whose hello has
	// "reattach":true.
	TypeReattach = "reattach"
	// Optional requests (PROTOCOL.md §3.8), answered only by a server whose
	// hello lists them in "requests" (the in-process helper of restore.Open).
	TypeWait    = "wait"    // target → server: fill everything; server → target: done
	TypeProfile = "profile" // target → server: the recorded profile; server → target + fd
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
type RefusedError struct {
	Text string
	Code string // the message's "code" member (PROTOCOL.md §3.4), "" if none
}

func (e *RefusedError) Error() string { return "attach: refused by peer: " + e.Text }

// Is makes errors.Is(err, ErrRefused) true, and errors.Is(err, S) for the
// sentinel S of the message's code (format.ErrChecksum for "checksum"...).
func (e *RefusedError) Is(target error) bool {
	return target == ErrRefused || codeIs(e.Code, target)
}

// Region is one snapshot region as the hello describes it: the loader's
// layout region, sent as is (one type, no conversion).
type Region = engine.LayoutRegion

// Hello is the server's first message, sent with the backing file's fd.
// Its regions travel in the "regions" messages that follow it (SendHello,
// RecvHello): RegionCount announces how many.
type Hello struct {
	Type        string   `json:"type"`
	Version     int      `json:"version"`
	Backing     string   `json:"backing"`
	PageSize    uint64   `json:"page_size"`
	ChunkSize   uint64   `json:"chunk_size"`
	FileSize    uint64   `json:"file_size"`
	Snapshot    string   `json:"snapshot"`
	RegionCount int      `json:"region_count"`
	Regions     []Region `json:"-"` // in snapshot order; a region's identity is its index
	// SnapshotID identifies the snapshot's content (restore.SnapshotID): a
	// re-attaching target refuses a server of another snapshot.
	SnapshotID string `json:"snapshot_id,omitempty"`
	// Reattach: this server accepts "reattach" (PROTOCOL.md §5.1).
	Reattach bool `json:"reattach,omitempty"`
	// Adopting: the server has no backing yet (load --adopt): the hello
	// carries no fd, and only a re-attaching target (handing its backing
	// back) is served until one did.
	Adopting bool `json:"adopting,omitempty"`
	// Requests lists the optional requests (TypeWait, TypeProfile) this
	// server answers after ready; left out when none (PROTOCOL.md §3.8).
	Requests []string `json:"requests,omitempty"`
}

// Mapping is one range of the backing file a target mapped and registered.
type Mapping struct {
	// Region is the index (in the hello's snapshot order) of the region
	// this mapping belongs to, or NoRegion for any part of the file. On the
	// wire it is the "region" member, left out for NoRegion.
	Region           int
	BaseHostVirtAddr uint64
	Size             uint64
	Offset           uint64
	PageSize         uint64
	Private          bool
}

type wireMapping struct {
	Region           *int   `json:"region,omitempty"`
	BaseHostVirtAddr uint64 `json:"base_host_virt_addr"`
	Size             uint64 `json:"size"`
	Offset           uint64 `json:"offset"`
	PageSize         uint64 `json:"page_size"`
	Private          bool   `json:"private"`
}

// MarshalJSON writes the wire form (no "region" member for NoRegion).
func (m Mapping) MarshalJSON() ([]byte, error) {
	w := wireMapping{BaseHostVirtAddr: m.BaseHostVirtAddr, Size: m.Size, Offset: m.Offset, PageSize: m.PageSize, Private: m.Private}
	if m.Region != NoRegion {
		r := m.Region
		w.Region = &r
	}
	return json.Marshal(w)
}

// UnmarshalJSON reads the wire form (no "region" member: NoRegion).
func (m *Mapping) UnmarshalJSON(b []byte) error {
	var w wireMapping
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	*m = Mapping{Region: NoRegion, BaseHostVirtAddr: w.BaseHostVirtAddr, Size: w.Size, Offset: w.Offset, PageSize: w.PageSize, Private: w.Private}
	if w.Region != nil {
		if *w.Region < 0 {
			return &json.UnmarshalTypeError{Value: "number " + strconv.Itoa(*w.Region), Type: reflect.TypeFor[uint64](), Field: "region"}
		}
		m.Region = *w.Region
	}
	return nil
}

// Attach is the target's answer to the hello, sent with its userfaultfd.
// Its mappings travel in the "mappings" messages that follow it
// (SendAttach, RecvAttach): MappingCount announces how many.
type Attach struct {
	Type         string    `json:"type"`
	Version      int       `json:"version"`
	UffdFeatures uint64    `json:"uffd_features"`
	MappingCount int       `json:"mapping_count"`
	Mappings     []Mapping `json:"-"`
}

// Batch is a "regions" or "mappings" message: items [First, First+n) of
// the list its header announced, in order.
type Batch struct {
	Type     string    `json:"type"`
	First    int       `json:"first"`
	Regions  []Region  `json:"regions,omitempty"`
	Mappings []Mapping `json:"mappings,omitempty"`
}

// Reply is every other message: ready, error, stats (request and reply),
// detach, bye, shutdown, wait and profile.
type Reply struct {
	Type  string          `json:"type"`
	Error string          `json:"error,omitempty"`
	Code  string          `json:"code,omitempty"` // error, wait: what kind of error (ErrorCode)
	Stats json.RawMessage `json:"stats,omitempty"`
}

// Envelope is what every message has: its type.
type Envelope struct {
	Type string `json:"type"`
}

var knownTypes = map[string]bool{
	TypeHello: true, TypeAttach: true, TypeReady: true, TypeError: true,
	TypeStats: true, TypeDetach: true, TypeBye: true, TypeShutdown: true,
	TypeRegions: true, TypeMappings: true, TypeReattach: true, TypeWait: true, TypeProfile: true,
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
		return &RefusedError{Text: r.Error, Code: r.Code}
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

// ValidateHeader checks the hello message itself, before its regions
// arrive: version, backing, page size, chunk size, file size and the
// announced region count.
func (h *Hello) ValidateHeader() error {
	const m = TypeHello
	if h.Version != Version {
		return invalid(m, "version", "protocol version %d, this side speaks %d%s", h.Version, Version, versionHint(h.Version))
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
	if h.RegionCount < 1 || h.RegionCount > MaxRegions {
		return invalid(m, "region_count", "%d regions, want 1..%d", h.RegionCount, MaxRegions)
	}
	return nil
}

// versionHint says which side to upgrade when the peer speaks version v.
func versionHint(v int) string {
	switch {
	case v < Version:
		return " (the peer is older: rebuild it against this uffdrestore's client library, csrc/ur_client.c or restore/attach)"
	case v > Version:
		return " (the peer is newer: upgrade this side to the same uffdrestore release)"
	}
	return ""
}

// Validate checks a whole hello (header and its RegionCount regions) the
// way a client should before mapping anything.
func (h *Hello) Validate() error {
	const m = TypeHello
	if err := h.ValidateHeader(); err != nil {
		return err
	}
	if len(h.Regions) != h.RegionCount {
		return invalid(m, "regions", "%d regions, the hello announced %d", len(h.Regions), h.RegionCount)
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

// Find returns the indexes of the regions named name, in snapshot order.
// Names need not be unique (a process snapshot has many "anon" regions
// and a library mapped several times under one path): a region's identity
// is its index.
func (h *Hello) Find(name string) []int { return engine.Layout{Regions: h.Regions}.Find(name) }

// ValidateHeader checks the attach message itself, before its mappings
// arrive: version and the announced mapping count.
func (a *Attach) ValidateHeader() error {
	const m = TypeAttach
	if a.Version != Version {
		return invalid(m, "version", "protocol version %d, the server speaks %d%s", a.Version, Version, versionHint(a.Version))
	}
	if a.MappingCount < 1 || a.MappingCount > MaxMappings {
		return invalid(m, "mapping_count", "%d mappings, want 1..%d", a.MappingCount, MaxMappings)
	}
	return nil
}

// Validate checks an attach (header and its MappingCount mappings) against
// the hello it answers: version, 1..MaxMappings mappings, each page
// aligned, inside the file (and inside its region when it names one), none
// overlapping another in the target's address space.
func (a *Attach) Validate(h *Hello) error {
	const m = TypeAttach
	if err := a.ValidateHeader(); err != nil {
		return err
	}
	if len(a.Mappings) != a.MappingCount {
		return invalid(m, "mappings", "%d mappings, the attach announced %d", len(a.Mappings), a.MappingCount)
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
		if mp.Region != NoRegion {
			if mp.Region < 0 || mp.Region >= len(h.Regions) {
				return invalid(m, f("region"), "%d is not a region index of the hello (it has %d regions, 0..%d)", mp.Region, len(h.Regions), len(h.Regions)-1)
			}
			r := h.Regions[mp.Region]
			if mp.Offset < r.Offset || mp.Offset+mp.Size > r.Offset+r.Size {
				return invalid(m, f("offset"), "file range [%d, +%d) is outside region %d %q [%d, +%d)", mp.Offset, mp.Size, mp.Region, r.Name, r.Offset, r.Size)
			}
		}
	}
	// No two mappings overlap in the target: sort by address, compare
	// neighbours (O(n log n): an attach may carry thousands).
	order := make([]int, len(a.Mappings))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(x, y int) int {
		return cmp.Compare(a.Mappings[x].BaseHostVirtAddr, a.Mappings[y].BaseHostVirtAddr)
	})
	for k := 1; k < len(order); k++ {
		p, q := a.Mappings[order[k-1]], a.Mappings[order[k]]
		if q.BaseHostVirtAddr < p.BaseHostVirtAddr+p.Size {
			i, j := max(order[k-1], order[k]), min(order[k-1], order[k])
			mi := a.Mappings[i]
			return invalid(m, fmt.Sprintf("mappings[%d].base_host_virt_addr", i), "[%#x, +%d) overlaps mappings[%d]", mi.BaseHostVirtAddr, mi.Size, j)
		}
	}
	return nil
}
