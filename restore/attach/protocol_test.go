package attach

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

func testHello() Hello {
	return Hello{
		Type: TypeHello, Version: 1, Backing: BackingHugetlb, PageSize: 2 << 20, ChunkSize: 2 << 20,
		FileSize: 8 << 20, Snapshot: "x.snap",
		Regions: []Region{
			{Name: "a", Offset: 0, Size: 4 << 20, Length: 3<<20 + 1, Addr: 0x400000, Prot: 3},
			{Name: "b", Offset: 4 << 20, Size: 2 << 20, Length: 2 << 20, Prot: 1},
		},
	}
}

func testAttach() Attach {
	return Attach{Type: TypeAttach, Version: 1, UffdFeatures: 0x600, Mappings: []Mapping{
		{Region: "a", BaseHostVirtAddr: 0x7f0000000000, Size: 4 << 20, Offset: 0, PageSize: 2 << 20},
		{Region: "b", BaseHostVirtAddr: 0x7f0000400000, Size: 2 << 20, Offset: 4 << 20, PageSize: 2 << 20, Private: true},
	}}
}

func TestRoundTrip(t *testing.T) {
	h := testHello()
	b, err := Encode(h)
	if err != nil {
		t.Fatal(err)
	}
	// Field names are the protocol's, exactly.
	for _, k := range []string{`"type":"hello"`, `"version":1`, `"backing":"hugetlb"`, `"page_size":2097152`,
		`"chunk_size":2097152`, `"file_size":8388608`, `"snapshot":"x.snap"`, `"regions":[`, `"name":"a"`,
		`"offset":0`, `"size":4194304`, `"length":3145729`, `"addr":4194304`, `"prot":3`} {
		if !bytes.Contains(b, []byte(k)) {
			t.Errorf("hello JSON %s lacks %s", b, k)
		}
	}
	var h2 Hello
	if err := Decode(b, TypeHello, &h2); err != nil {
		t.Fatal(err)
	}
	if err := h2.Validate(); err != nil {
		t.Fatal(err)
	}
	a := testAttach()
	b, err = Encode(a)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{`"type":"attach"`, `"uffd_features":1536`, `"mappings":[`, `"region":"a"`,
		`"base_host_virt_addr":139637976727552`, `"page_size":2097152`, `"private":true`} {
		if !bytes.Contains(b, []byte(k)) {
			t.Errorf("attach JSON %s lacks %s", b, k)
		}
	}
	var a2 Attach
	if err := Decode(b, TypeAttach, &a2); err != nil {
		t.Fatal(err)
	}
	if err := a2.Validate(&h2); err != nil {
		t.Fatal(err)
	}
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
		{"fieldtype", `{"type":"attach","version":1,"mappings":[{"size":"big"}]}`, "mappings.size: wrong JSON type"},
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
		{"version", func(a *Attach) { a.Version = 2 }, "version: protocol version 2"},
		{"none", func(a *Attach) { a.Mappings = nil }, "mappings: 0 mappings"},
		{"toomany", func(a *Attach) {
			a.Mappings = make([]Mapping, MaxMappings+1)
		}, "mappings: 1025 mappings"},
		{"pagesize", func(a *Attach) { a.Mappings[0].PageSize = 4096 }, "mappings[0].page_size"},
		{"misaligned base", func(a *Attach) { a.Mappings[1].BaseHostVirtAddr += 4096 }, "mappings[1].base_host_virt_addr"},
		{"zero base", func(a *Attach) { a.Mappings[1].BaseHostVirtAddr = 0 }, "mappings[1].base_host_virt_addr"},
		{"misaligned size", func(a *Attach) { a.Mappings[0].Size = 4096 }, "mappings[0].size"},
		{"zero size", func(a *Attach) { a.Mappings[0].Size = 0 }, "mappings[0].size"},
		{"misaligned offset", func(a *Attach) { a.Mappings[1].Offset += 4096 }, "mappings[1].offset"},
		{"outside file", func(a *Attach) { a.Mappings[1].Offset = 8 << 20 }, "mappings[1].size: file range"},
		{"overflow", func(a *Attach) { a.Mappings[1].Offset = 1<<64 - 2<<20 }, "mappings[1].size: file range"},
		{"address overflow", func(a *Attach) { a.Mappings[1].BaseHostVirtAddr = 1<<64 - 2<<20 }, "outside a user address space"},
		{"unknown region", func(a *Attach) { a.Mappings[0].Region = "zz" }, `mappings[0].region: no region named "zz"`},
		{"outside region", func(a *Attach) { a.Mappings[1].Region = "a" }, `outside region "a"`},
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
	// A mapping without a region name may map any part of the file.
	a := testAttach()
	a.Mappings[0].Region = ""
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
		{func(h *Hello) { h.Regions = nil }, "regions"},
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
	a := testAttach()
	b, _ := json.Marshal(a)
	f.Add(b)
	f.Add([]byte(`{"type":"attach","version":1,"mappings":[]}`))
	f.Add([]byte(`{"type":"error","error":"x"}`))
	h := testHello()
	f.Fuzz(func(t *testing.T, raw []byte) {
		var a Attach
		if err := Decode(raw, TypeAttach, &a); err != nil {
			return
		}
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
