package attach

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"runtime"
	"strings"
	"testing"

	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

func testHello() Hello {
	return Hello{
		Type: TypeHello, Version: Version, Backing: BackingHugetlb, PageSize: 2 << 20, ChunkSize: 2 << 20,
		FileSize: 8 << 20, Snapshot: "x.snap", RegionCount: 2,
		Regions: []Region{
			{Name: "a", Offset: 0, Size: 4 << 20, Length: 3<<20 + 1, Addr: 0x400000, Prot: 3},
			{Name: "b", Offset: 4 << 20, Size: 2 << 20, Length: 2 << 20, Prot: 1},
		},
	}
}

func testAttach() Attach {
	return Attach{Type: TypeAttach, Version: Version, UffdFeatures: 0x600, MappingCount: 2, Mappings: []Mapping{
		{Region: 0, BaseHostVirtAddr: 0x7f0000000000, Size: 4 << 20, Offset: 0, PageSize: 2 << 20},
		{Region: 1, BaseHostVirtAddr: 0x7f0000400000, Size: 2 << 20, Offset: 4 << 20, PageSize: 2 << 20, Private: true},
	}}
}

// msgQueue is an in-memory transport for SendHello/RecvHello and
// SendAttach/RecvAttach: it records every message sent.
type msgQueue struct {
	msgs [][]byte
	fds  [][]int
}

func (q *msgQueue) send(v any, fds ...int) error {
	b, err := marshal(v)
	if err != nil {
		return err
	}
	q.msgs, q.fds = append(q.msgs, b), append(q.fds, fds)
	return nil
}

func (q *msgQueue) recv() ([]byte, []int, error) {
	if len(q.msgs) == 0 {
		return nil, nil, ErrClosed
	}
	b, f := q.msgs[0], q.fds[0]
	q.msgs, q.fds = q.msgs[1:], q.fds[1:]
	return b, f, nil
}

func TestRoundTrip(t *testing.T) {
	h := testHello()
	var q msgQueue
	if err := SendHello(q.send, h, 7); err != nil {
		t.Fatal(err)
	}
	if len(q.msgs) != 2 || len(q.fds[0]) != 1 || len(q.fds[1]) != 0 {
		t.Fatalf("hello went as %d messages (fds %v), want the hello with 1 fd and one regions batch", len(q.msgs), q.fds)
	}
	// Field names are the protocol's, exactly.
	for _, k := range []string{`"type":"hello"`, `"version":2`, `"backing":"hugetlb"`, `"page_size":2097152`,
		`"chunk_size":2097152`, `"file_size":8388608`, `"snapshot":"x.snap"`, `"region_count":2`} {
		if !bytes.Contains(q.msgs[0], []byte(k)) {
			t.Errorf("hello JSON %s lacks %s", q.msgs[0], k)
		}
	}
	for _, k := range []string{`"type":"regions"`, `"first":0`, `"regions":[`, `"name":"a"`,
		`"offset":0`, `"size":4194304`, `"length":3145729`, `"addr":4194304`, `"prot":3`} {
		if !bytes.Contains(q.msgs[1], []byte(k)) {
			t.Errorf("regions JSON %s lacks %s", q.msgs[1], k)
		}
	}
	h2, fds, err := RecvHello(q.recv)
	if err != nil || len(fds) != 1 || fds[0] != 7 {
		t.Fatalf("RecvHello: %v (fds %v)", err, fds)
	}
	if !reflect.DeepEqual(h2.Regions, h.Regions) {
		t.Errorf("regions %+v, want %+v", h2.Regions, h.Regions)
	}
	a := testAttach()
	if err := SendAttach(q.send, a, 9); err != nil {
		t.Fatal(err)
	}
	if len(q.msgs) != 2 {
		t.Fatalf("attach went as %d messages, want 2", len(q.msgs))
	}
	for _, k := range []string{`"type":"attach"`, `"uffd_features":1536`, `"mapping_count":2`} {
		if !bytes.Contains(q.msgs[0], []byte(k)) {
			t.Errorf("attach JSON %s lacks %s", q.msgs[0], k)
		}
	}
	for _, k := range []string{`"type":"mappings"`, `"first":0`, `"mappings":[`, `"region":0`, `"region":1`,
		`"base_host_virt_addr":139637976727552`, `"page_size":2097152`, `"private":true`} {
		if !bytes.Contains(q.msgs[1], []byte(k)) {
			t.Errorf("mappings JSON %s lacks %s", q.msgs[1], k)
		}
	}
	a2, fds, err := RecvAttach(q.recv)
	if err != nil || len(fds) != 1 || fds[0] != 9 {
		t.Fatalf("RecvAttach: %v (fds %v)", err, fds)
	}
	if err := a2.Validate(&h2); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a2.Mappings, a.Mappings) {
		t.Errorf("mappings %+v, want %+v", a2.Mappings, a.Mappings)
	}
	var b []byte
	b, _ = Encode(Reply{Type: TypeReady})
	if string(b) != `{"type":"ready"}` {
		t.Errorf("ready = %s", b)
	}
	b, _ = Encode(Reply{Type: TypeBye, Stats: json.RawMessage(`{"faults":3}`)})
	if string(b) != `{"type":"bye","stats":{"faults":3}}` {
		t.Errorf("bye = %s", b)
	}
}

func TestDecodeErrors(t *testing.T) {
	cases := []struct {
		name, in, want string
	}{
		{"empty", ``, "malformed JSON"},
		{"garbage", `hello`, "malformed JSON"},
		{"truncated", `{"type":"attach","version":1,`, "malformed JSON"},
		{"array", `[1,2]`, "malformed JSON"},
		{"trailing", `{"type":"attach"} x`, "malformed JSON"},
		{"notype", `{"version":1}`, "type: missing"},
		{"typenum", `{"type":5}`, "malformed JSON"},
		{"unknown", `{"type":"launch"}`, `unknown message type "launch"`},
		{"badutf8", "{\"type\":\"attach\",\"x\":\"\xff\"}", "not valid UTF-8"},
		{"wrongtype", `{"type":"stats"}`, `expected a "attach" message, got "stats"`},
		{"fieldtype", `{"type":"attach","version":2,"mapping_count":"big"}`, "mapping_count: wrong JSON type"},
		{"negative", `{"type":"attach","version":1,"uffd_features":-1}`, "uffd_features: wrong JSON type"},
		{"float", `{"type":"attach","version":1.5}`, "version: wrong JSON type"},
		{"overflow", `{"type":"attach","version":1,"uffd_features":18446744073709551616}`, "uffd_features: wrong JSON type"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var a Attach
			err := Decode([]byte(c.in), TypeAttach, &a)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Decode(%q) = %v, want an error containing %q", c.in, err, c.want)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error %v does not match ErrInvalid", err)
			}
		})
	}
	// Oversized.
	big := `{"type":"attach","pad":"` + strings.Repeat("x", MaxMsgSize) + `"}`
	var a Attach
	if err := Decode([]byte(big), TypeAttach, &a); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversized: %v, want ErrTooLarge", err)
	}
	// An error message answers any expectation with RefusedError.
	err := Decode([]byte(`{"type":"error","error":"uid 5 may not attach"}`), TypeHello, &Hello{})
	var re *RefusedError
	if !errors.As(err, &re) || re.Text != "uid 5 may not attach" || !errors.Is(err, ErrRefused) {
		t.Errorf("error message: %v", err)
	}
	// Unknown fields are ignored (forward compatibility).
	if err := Decode([]byte(`{"type":"ready","extra":{"a":[1,2]}}`), TypeReady, &Reply{}); err != nil {
		t.Errorf("unknown field: %v", err)
	}
}

func TestValidateAttach(t *testing.T) {
	h := testHello()
	cases := []struct {
		name string
		edit func(a *Attach)
		want string
	}{
		{"version", func(a *Attach) { a.Version = 1 }, "version: protocol version 1, the server speaks 2 (the peer is older"},
		{"none", func(a *Attach) { a.Mappings, a.MappingCount = nil, 0 }, "mapping_count: 0 mappings"},
		{"toomany", func(a *Attach) {
			a.Mappings = make([]Mapping, MaxMappings+1)
			a.MappingCount = len(a.Mappings)
		}, "mapping_count: 65537 mappings"},
		{"miscount", func(a *Attach) { a.MappingCount = 3 }, "mappings: 2 mappings, the attach announced 3"},
		{"pagesize", func(a *Attach) { a.Mappings[0].PageSize = 4096 }, "mappings[0].page_size"},
		{"misaligned base", func(a *Attach) { a.Mappings[1].BaseHostVirtAddr += 4096 }, "mappings[1].base_host_virt_addr"},
		{"zero base", func(a *Attach) { a.Mappings[1].BaseHostVirtAddr = 0 }, "mappings[1].base_host_virt_addr"},
		{"misaligned size", func(a *Attach) { a.Mappings[0].Size = 4096 }, "mappings[0].size"},
		{"zero size", func(a *Attach) { a.Mappings[0].Size = 0 }, "mappings[0].size"},
		{"misaligned offset", func(a *Attach) { a.Mappings[1].Offset += 4096 }, "mappings[1].offset"},
		{"outside file", func(a *Attach) { a.Mappings[1].Offset = 8 << 20 }, "mappings[1].size: file range"},
		{"overflow", func(a *Attach) { a.Mappings[1].Offset = 1<<64 - 2<<20 }, "mappings[1].size: file range"},
		{"address overflow", func(a *Attach) { a.Mappings[1].BaseHostVirtAddr = 1<<64 - 2<<20 }, "outside a user address space"},
		{"unknown region", func(a *Attach) { a.Mappings[0].Region = 2 }, `mappings[0].region: 2 is not a region index of the hello`},
		{"outside region", func(a *Attach) { a.Mappings[1].Region = 0 }, `outside region 0 "a"`},
		{"overlap", func(a *Attach) { a.Mappings[1].BaseHostVirtAddr = 0x7f0000200000 }, "mappings[1].base_host_virt_addr: [0x7f0000200000, +2097152) overlaps mappings[0]"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := testAttach()
			c.edit(&a)
			err := a.Validate(&h)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Validate = %v, want %q", err, c.want)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("%v does not match ErrInvalid", err)
			}
		})
	}
	// A mapping without a region may map any part of the file.
	a := testAttach()
	a.Mappings[0].Region = NoRegion
	a.Mappings[0].Size = 8 << 20
	a.Mappings[1].BaseHostVirtAddr = 0x7f0001000000
	if err := a.Validate(&h); err != nil {
		t.Error(err)
	}
}

func TestValidateHello(t *testing.T) {
	cases := []struct {
		edit func(h *Hello)
		want string
	}{
		{func(h *Hello) { h.Version = 0 }, "version"},
		{func(h *Hello) { h.Backing = "tmpfs" }, "backing"},
		{func(h *Hello) { h.PageSize = 3000 }, "page_size"},
		{func(h *Hello) { h.ChunkSize = 3 }, "chunk_size"},
		{func(h *Hello) { h.FileSize = 1 }, "file_size"},
		{func(h *Hello) { h.Regions = nil }, "regions: 0 regions, the hello announced 2"},
		{func(h *Hello) { h.Regions, h.RegionCount = nil, 0 }, "region_count: 0 regions"},
		{func(h *Hello) { h.Regions[0].Offset = 4096 }, "regions[0].offset"},
		{func(h *Hello) { h.Regions[1].Size = 0 }, "regions[1].length"},
		{func(h *Hello) { h.Regions[1].Size = 3 << 20 }, "regions[1].size"},
		{func(h *Hello) { h.Regions[1].Length = 2<<20 + 1 }, "regions[1].length"},
		{func(h *Hello) { h.Regions[1].Length = 1 << 20 }, ""}, // rounds up to size: valid
		{func(h *Hello) { h.Regions[1].Size, h.Regions[1].Length = 0, 0 }, ""},
		{func(h *Hello) { h.Regions[1].Size = 4 << 20 }, "regions[1].length"},
		{func(h *Hello) { h.Regions[1].Offset = 8 << 20 }, "regions[1].size"},
		{func(h *Hello) { h.Regions[1].Prot = 8 }, "regions[1].prot"},
	}
	for _, c := range cases {
		h := testHello()
		c.edit(&h)
		err := h.Validate()
		if c.want == "" {
			if err != nil {
				t.Errorf("Validate = %v, want nil", err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Validate = %v, want %q", err, c.want)
		}
	}
}

func TestTransport(t *testing.T) {
	a, b := socketPair(t)
	before := countFDs(t)
	memfd, err := unix.MemfdCreate("x", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(memfd)
	if err := SendMsg(a, Reply{Type: TypeReady}, memfd); err != nil {
		t.Fatal(err)
	}
	raw, fds, err := RecvMsg(b)
	if err != nil {
		t.Fatal(err)
	}
	if string(raw) != `{"type":"ready"}` || len(fds) != 1 {
		t.Fatalf("got %s with %d fds", raw, len(fds))
	}
	if fl, _ := unix.FcntlInt(uintptr(fds[0]), unix.F_GETFD, 0); fl&unix.FD_CLOEXEC == 0 {
		t.Error("received fd is not close-on-exec")
	}
	CloseFDs(fds)

	// Too many fds: MSG_CTRUNC, all received ones closed.
	many := []int{memfd, memfd, memfd, memfd, memfd, memfd}
	if err := SendMsg(a, Reply{Type: TypeReady}, many...); err != nil {
		t.Fatal(err)
	}
	if _, _, err := RecvMsg(b); !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "message too large") {
		t.Errorf("6 fds: %v, want message too large", err)
	}
	// Too many bytes: MSG_TRUNC. The sender must bypass the size check.
	rc, _ := a.SyscallConn()
	big := bytes.Repeat([]byte("x"), MaxMsgSize+100)
	rc.Write(func(fd uintptr) bool {
		err = unix.Sendmsg(int(fd), big, unix.UnixRights(memfd), nil, 0)
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := RecvMsg(b); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversized: %v, want ErrTooLarge", err)
	}
	if err := SendMsg(a, big); !errors.Is(err, ErrTooLarge) {
		t.Errorf("sending oversized: %v", err)
	}
	if n := countFDs(t); n != before+1 { // +1: memfd
		t.Errorf("fds: %d before, %d after (+1 memfd expected): a rejected message leaked its fds", before, n)
	}
	// Close: an empty read.
	a.Close()
	if _, _, err := RecvMsg(b); !errors.Is(err, ErrClosed) {
		t.Errorf("after close: %v, want ErrClosed", err)
	}
}

func TestTransportFD(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	if err := SendMsgFD(fds[0], []byte(`{"type":"detach"}`), fds[0]); err != nil {
		t.Fatal(err)
	}
	raw, got, err := RecvMsgFD(fds[1])
	if err != nil || string(raw) != `{"type":"detach"}` || len(got) != 1 {
		t.Fatalf("RecvMsgFD = %s, %v, %v", raw, got, err)
	}
	CloseFDs(got)
}

func TestIsUserfaultfd(t *testing.T) {
	memfd, err := unix.MemfdCreate("x", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(memfd)
	if IsUserfaultfd(memfd) {
		t.Error("a memfd is not a userfaultfd")
	}
	u, err := uffd.Open(uffd.OpenOptions{}, 0)
	if err != nil {
		t.Skipf("userfaultfd: %v", err)
	}
	defer u.Close()
	if !IsUserfaultfd(u.Fd()) {
		t.Error("a userfaultfd is not recognised")
	}
}

func FuzzDecodeAttach(f *testing.F) {
	var q msgQueue
	SendAttach(q.send, testAttach(), 1)
	f.Add(q.msgs[1])
	f.Add([]byte(`{"type":"mappings","first":0,"mappings":[]}`))
	f.Add([]byte(`{"type":"error","error":"x"}`))
	h := testHello()
	f.Fuzz(func(t *testing.T, raw []byte) {
		var bt Batch
		if err := Decode(raw, TypeMappings, &bt); err != nil {
			return
		}
		a := Attach{Version: Version, MappingCount: len(bt.Mappings), Mappings: bt.Mappings}
		if err := a.Validate(&h); err != nil {
			return
		}
		// What validates is inside the file and page aligned.
		for _, m := range a.Mappings {
			if m.Offset+m.Size > h.FileSize || m.Offset%h.PageSize != 0 || m.Size%h.PageSize != 0 {
				t.Fatalf("accepted %+v", m)
			}
		}
	})
}

// TestRecvMsgAllocations: a receive reuses its MaxMsgSize buffer and
// allocates about the message's own size, not a new 64 KiB each time (a
// fresh helper paid 0.3-0.5 ms of its first byte for those).
func TestRecvMsgAllocations(t *testing.T) {
	a, b := socketPair(t)
	const n = 100
	msg := Reply{Type: TypeReady}
	want, _ := Encode(msg)
	for i := 0; i < 3; i++ { // warm the pool
		if err := SendMsg(a, msg); err != nil {
			t.Fatal(err)
		}
		if _, _, err := RecvMsg(b); err != nil {
			t.Fatal(err)
		}
	}
	var before, after runtime.MemStats
	for i := 0; i < n; i++ {
		if err := SendMsg(a, msg); err != nil {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&before)
	for i := 0; i < n; i++ {
		raw, fds, err := RecvMsg(b)
		if err != nil || len(fds) != 0 || !bytes.Equal(raw, want) {
			t.Fatalf("receive %d: %q, %v, %v", i, raw, fds, err)
		}
	}
	runtime.ReadMemStats(&after)
	// The race detector's sync.Pool drops some buffers on purpose: the
	// bound leaves room for that, and is still half a buffer per receive.
	if per := (after.TotalAlloc - before.TotalAlloc) / n; per > MaxMsgSize/2 {
		t.Errorf("a receive of a %d-byte message allocates %d bytes on average", len(want), per)
	}
}
