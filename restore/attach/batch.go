package attach

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// A hello's regions and an attach's mappings travel in batches: the header
// message (with its fd) announces the count, then "regions" / "mappings"
// messages of at most MaxMsgSize bytes each carry the items in order, each
// saying the index of its first item. So a snapshot of a process with
// thousands of mappings attaches although one message is bounded (a
// SOCK_SEQPACKET message must fit the socket buffer).

// batchOverhead is the bytes of a batch message besides its items:
// {"type":"mappings","first":N,"mappings":[ ... ]} with N < 2^63.
const batchOverhead = len(`{"type":"mappings","first":,"mappings":[]}`) + 20

// encodeBatches encodes items as batch messages of type typ (its array
// member is named typ too), each at most MaxMsgSize bytes.
func encodeBatches[T any](typ string, items []T) ([][]byte, error) {
	var out [][]byte
	var cur []byte
	first, n := 0, 0
	flush := func() {
		if n == 0 {
			return
		}
		b := make([]byte, 0, len(cur)+batchOverhead)
		b = append(b, `{"type":"`+typ+`","first":`...)
		b = strconv.AppendInt(b, int64(first), 10)
		b = append(b, `,"`+typ+`":[`...)
		b = append(b, cur...)
		b = append(b, "]}"...)
		out = append(out, b)
		first += n
		cur, n = cur[:0], 0
	}
	for i, it := range items {
		e, err := json.Marshal(it)
		if err != nil {
			return nil, fmt.Errorf("attach: encode %s[%d]: %w", typ, i, err)
		}
		if len(e)+batchOverhead > MaxMsgSize {
			return nil, fmt.Errorf("%w: %s[%d] alone is %d bytes encoded, more than one message (%d bytes) holds", ErrTooLarge, typ, i, len(e), MaxMsgSize-batchOverhead)
		}
		if n > 0 && len(cur)+1+len(e)+batchOverhead > MaxMsgSize {
			flush()
		}
		if n > 0 {
			cur = append(cur, ',')
		}
		cur = append(cur, e...)
		n++
	}
	flush()
	return out, nil
}

// recvBatches receives batch messages of type typ until count items
// arrived, appending them with get (which returns the batch's items).
func recvBatches[T any](recv func() ([]byte, []int, error), header, typ string, count int, get func(*Batch) []T) ([]T, error) {
	items := make([]T, 0, min(count, 4096))
	for len(items) < count {
		raw, fds, err := recv()
		if err != nil {
			return nil, fmt.Errorf("%s: receiving %s %d..%d of %d: %w", header, typ, len(items), count-1, count, err)
		}
		CloseFDs(fds)
		var b Batch
		if err := Decode(raw, typ, &b); err != nil {
			return nil, err
		}
		if len(fds) != 0 {
			return nil, invalid(typ, "fds", "%d file descriptors came with a %q message, want none", len(fds), typ)
		}
		got := get(&b)
		switch {
		case b.First != len(items):
			return nil, invalid(typ, "first", "%d, expected %d (batches come in order)", b.First, len(items))
		case len(got) == 0:
			return nil, invalid(typ, typ, "empty batch")
		case len(got) > count-len(items):
			return nil, invalid(typ, typ, "%d more, but the %s announced %d in all and %d came already", len(got), header, count, len(items))
		}
		items = append(items, got...)
	}
	return items, nil
}

// SendHello sends h (its header with the backing fd, then its regions in
// batches) through send.
func SendHello(send func(v any, fds ...int) error, h Hello, backingFD int) error {
	h.Type, h.Version, h.RegionCount = TypeHello, Version, len(h.Regions)
	batches, err := encodeBatches(TypeRegions, h.Regions)
	if err != nil {
		return err
	}
	var fds []int
	if backingFD >= 0 { // < 0: an adopting server has none yet
		fds = []int{backingFD}
	}
	if err := send(h, fds...); err != nil {
		return err
	}
	for _, b := range batches {
		if err := send(b); err != nil {
			return err
		}
	}
	return nil
}

// RecvHello receives a hello and its regions through recv and validates
// it. It returns the fds that came with the hello (the caller owns them,
// also when it fails with a validation error; nil on a transport error).
func RecvHello(recv func() ([]byte, []int, error)) (Hello, []int, error) {
	var h Hello
	raw, fds, err := recv()
	if err != nil {
		return h, nil, err
	}
	if err := Decode(raw, TypeHello, &h); err != nil {
		return h, fds, err
	}
	if err := h.ValidateHeader(); err != nil {
		return h, fds, err
	}
	h.Regions, err = recvBatches(recv, TypeHello, TypeRegions, h.RegionCount, func(b *Batch) []Region { return b.Regions })
	if err != nil {
		return h, fds, err
	}
	return h, fds, h.Validate()
}

// SendAttach sends a (its header with the userfaultfd, then its mappings
// in batches) through send. A reattach (a.Type TypeReattach) sends the
// backing fd after the userfaultfd (extra).
func SendAttach(send func(v any, fds ...int) error, a Attach, uffdFD int, extra ...int) error {
	if a.Type != TypeReattach {
		a.Type = TypeAttach
	}
	a.Version, a.MappingCount = Version, len(a.Mappings)
	batches, err := encodeBatches(TypeMappings, a.Mappings)
	if err != nil {
		return err
	}
	if err := send(a, append([]int{uffdFD}, extra...)...); err != nil {
		return err
	}
	for _, b := range batches {
		if err := send(b); err != nil {
			return err
		}
	}
	return nil
}

// RecvAttach receives an attach (or reattach: a.Type says which) header
// and its mappings through recv (it
// does not check them against the hello: Attach.Validate does). The fds
// are those that came with the header; the caller owns them.
func RecvAttach(recv func() ([]byte, []int, error)) (Attach, []int, error) {
	var a Attach
	raw, fds, err := recv()
	if err != nil {
		return a, nil, err
	}
	// The version first: another version's members may not even parse.
	var v struct {
		Version int `json:"version"`
	}
	typ, _ := PeekType(raw)
	if (typ == TypeAttach || typ == TypeReattach) && json.Unmarshal(raw, &v) == nil && v.Version != Version {
		a.Version = v.Version
		return a, fds, a.ValidateHeader()
	}
	if typ != TypeReattach {
		typ = TypeAttach
	}
	if err := Decode(raw, typ, &a); err != nil {
		return a, fds, err
	}
	if err := a.ValidateHeader(); err != nil {
		return a, fds, err
	}
	a.Mappings, err = recvBatches(recv, TypeAttach, TypeMappings, a.MappingCount, func(b *Batch) []Mapping { return b.Mappings })
	return a, fds, err
}

// MapCountReserve is how many mappings CheckLayout leaves to a target's
// own use (its program, libraries, heap, stacks, threads) besides one
// mapping per region.
const MapCountReserve = 1000

// maxMapCountPath is the kernel's per-process limit on mappings.
var maxMapCountPath = "/proc/sys/vm/max_map_count"

// CheckLayout checks that a target can attach to a server whose hello is
// h, so that a server refuses at start what no target could attach: 1 to
// MaxRegions regions, each of which fits one message, and no more regions
// to map than vm.max_map_count allows one process (a target maps each
// non-empty region once, plus MapCountReserve mappings of its own).
func CheckLayout(h Hello) error {
	n := len(h.Regions)
	if n == 0 {
		return fmt.Errorf("attach: the snapshot has no regions: there is nothing a target could map")
	}
	if n > MaxRegions {
		return fmt.Errorf("attach: the snapshot has %d regions; the attach protocol carries at most %d (one mapping each): make a snapshot of fewer regions (snapshot create --from-pid --region NAME selects mappings)", n, MaxRegions)
	}
	if _, err := encodeBatches(TypeRegions, h.Regions); err != nil {
		return fmt.Errorf("%w (region names are at most %d bytes)", err, 4096)
	}
	mapped := 0
	for _, r := range h.Regions {
		if r.Size > 0 {
			mapped++
		}
	}
	if mapped == 0 {
		return fmt.Errorf("attach: all %d regions of the snapshot are empty: there is nothing a target could map", n)
	}
	if b, err := os.ReadFile(maxMapCountPath); err == nil {
		if limit, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && mapped+MapCountReserve > limit {
			return fmt.Errorf("attach: a target maps each of the snapshot's %d non-empty regions, plus about %d mappings of its own, more than vm.max_map_count=%d allows one process: raise it (sysctl -w vm.max_map_count=%d) or make a snapshot of fewer regions", mapped, MapCountReserve, limit, mapped+2*MapCountReserve)
		}
	}
	return nil
}
