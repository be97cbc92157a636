package attach

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// TestDuplicateRegionNames: regions that share a name (as every snapshot
// of a process has: "anon", a library mapped several times under one path)
// attach through the C target and the Go client, each region served from
// its own range: a mapping names its region by index.
func TestDuplicateRegionNames(t *testing.T) {
	requireUffd(t, false)
	const page = 4096
	b := newFakeBackend(t, false, []regionSpec{
		{"/usr/lib/libx.so", 2 * page, 0x400000},
		{"anon", 5*page + 9, 0},
		{"/usr/lib/libx.so", 3 * page, 0x402000},
		{"anon", 7 * page, 0},
		{"[heap]", page, 0},
		{"anon", 2 * page, 0},
	})
	s, sock := listen(t, b, Options{})
	dump := filepath.Join(t.TempDir(), "dump")
	tg := startTarget(t, sock, "--dump", dump)
	if err := tg.wait(t, 30*time.Second); err != nil {
		t.Fatalf("C target: %v\n%s", err, tg.stderr)
	}
	if got, _ := os.ReadFile(dump); !bytes.Equal(got, b.want()) {
		t.Fatalf("C target's dump differs from the image (first difference at %d)", firstDiff(got, b.want()))
	}
	// The C library's lookups: ur_session_find is NULL unless exactly one
	// region has the name, ur_session_find_next iterates every one.
	if _, err := exec.LookPath("gcc"); err == nil {
		dir := t.TempDir()
		src := filepath.Join(dir, "find.c")
		os.WriteFile(src, []byte(`#include "ur_client.h"
#include <stdio.h>
int main(int argc, char **argv) {
	struct ur_session *s;
	(void)argc;
	if (ur_attach(argv[1], NULL, &s) < 0) {
		fprintf(stderr, "%s\n", ur_session_error(NULL));
		return 1;
	}
	size_t n = ur_session_nregions(s);
	printf("anon:");
	for (size_t i = ur_session_find_next(s, "anon", 0); i < n; i = ur_session_find_next(s, "anon", i + 1))
		printf(" %zu", i);
	const struct ur_region *h = ur_session_find(s, "[heap]");
	printf(" find(anon)=%s find([heap])=%ld find([stack])=%s\n", ur_session_find(s, "anon") ? "region" : "NULL",
	       h ? (long)(h - ur_session_region(s, 0)) : -1L, ur_session_find(s, "[stack]") ? "region" : "NULL");
	return ur_detach(s) < 0;
}
`), 0o644)
		exe := filepath.Join(dir, "find")
		args := append(append([]string{}, cflags...), "-I"+csrcDir(t), "-o", exe, src, filepath.Join(csrcDir(t), "ur_client.c"))
		if out, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
			t.Fatalf("gcc: %v\n%s", err, out)
		}
		out, err := exec.Command(exe, sock).CombinedOutput()
		if want := "anon: 1 3 5 find(anon)=NULL find([heap])=4 find([stack])=NULL\n"; err != nil || string(out) != want {
			t.Errorf("C lookups: %v: %q, want %q", err, out, want)
		}
	}
	cl, err := Dial(sock, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// This process serves the regions too: Go reads them only after C
	// touched them (a goroutine waiting in a fault cannot be stopped, and
	// a GC that waits for it holds the P the server needs).
	touchFromC(cl)
	for i, r := range cl.Regions {
		hr := b.hello.Regions[i]
		if !bytes.Equal(r.Data, b.image[hr.Offset:hr.Offset+hr.Length]) {
			t.Errorf("Go client: region %d %q differs", i, r.Name)
		}
	}
	// Name lookups: every match, or an error on ambiguity.
	if got := cl.Find("anon"); !reflect.DeepEqual(got, []int{1, 3, 5}) {
		t.Errorf(`Find("anon") = %v, want [1 3 5]`, got)
	}
	if _, err := cl.Region("anon"); !errors.Is(err, restore.ErrAmbiguousRegion) || !strings.Contains(err.Error(), "#1, #3, #5") {
		t.Errorf(`Region("anon") = %v, want an ambiguity error listing #1, #3, #5`, err)
	}
	if r, err := cl.Region("[heap]"); err != nil || r != &cl.Regions[4] {
		t.Errorf(`Region("[heap]") = %v, %v, want region 4`, r, err)
	}
	if _, err := cl.Region("[stack]"); !errors.Is(err, restore.ErrNoRegion) {
		t.Errorf(`Region("[stack]") = %v, want ErrNoRegion`, err)
	}
	if _, err := cl.Detach(); err != nil {
		t.Error(err)
	}
	waitFor(t, 5*time.Second, "no targets", func() bool { return len(s.Targets()) == 0 })
}

// TestBatches: a hello of thousands of regions and an attach of thousands
// of mappings travel as several messages, none over MaxMsgSize, and arrive
// whole and in order.
func TestBatches(t *testing.T) {
	const n = 5000
	h := Hello{Backing: BackingShmem, PageSize: 4096, ChunkSize: 65536, FileSize: n * 65536, Snapshot: "many.snap"}
	a := Attach{UffdFeatures: 3}
	for i := range n {
		h.Regions = append(h.Regions, Region{Name: fmt.Sprintf("/memfd:region-%d (deleted)", i%7), Offset: uint64(i) * 65536, Size: 4096, Length: 4000, Prot: 3})
		a.Mappings = append(a.Mappings, Mapping{Region: i, BaseHostVirtAddr: 0x7f0000000000 + uint64(i)*8192, Size: 4096, Offset: uint64(i) * 65536, PageSize: 4096})
	}
	var q msgQueue
	if err := SendHello(q.send, h, 3); err != nil {
		t.Fatal(err)
	}
	if len(q.msgs) < 5 {
		t.Errorf("%d regions went in %d messages; want several batches", n, len(q.msgs))
	}
	for i, m := range q.msgs {
		if len(m) > MaxMsgSize {
			t.Errorf("message %d: %d bytes", i, len(m))
		}
	}
	got, _, err := RecvHello(q.recv)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Regions, h.Regions) {
		t.Error("regions differ after the round trip")
	}
	if err := SendAttach(q.send, a, 4); err != nil {
		t.Fatal(err)
	}
	for i, m := range q.msgs {
		if len(m) > MaxMsgSize {
			t.Errorf("attach message %d: %d bytes", i, len(m))
		}
	}
	ga, _, err := RecvAttach(q.recv)
	if err != nil {
		t.Fatal(err)
	}
	if err := ga.Validate(&got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(ga.Mappings, a.Mappings) {
		t.Error("mappings differ after the round trip")
	}
}

// TestCheckLayout: Listen refuses at start what no target could attach,
// naming the limit and the fix.
func TestCheckLayout(t *testing.T) {
	one := func(n int, size uint64) Hello {
		h := Hello{Backing: BackingShmem, PageSize: 4096, ChunkSize: 65536}
		for i := range n {
			h.Regions = append(h.Regions, Region{Name: "anon", Offset: uint64(i) * 65536, Size: size, Length: size})
		}
		return h
	}
	limit := filepath.Join(t.TempDir(), "max_map_count")
	os.WriteFile(limit, []byte("3000\n"), 0o644)
	old := maxMapCountPath
	maxMapCountPath = limit
	defer func() { maxMapCountPath = old }()
	cases := []struct {
		name string
		h    Hello
		want string
	}{
		{"none", one(0, 4096), "no regions"},
		{"all empty", one(3, 0), "all 3 regions of the snapshot are empty"},
		{"too many", one(MaxRegions+1, 0), "65537 regions; the attach protocol carries at most 65536"},
		{"max_map_count", one(2500, 4096), "2500 non-empty regions, plus about 1000 mappings of its own, more than vm.max_map_count=3000 allows one process: raise it (sysctl -w vm.max_map_count=4500)"},
		{"huge name", func() Hello { h := one(1, 4096); h.Regions[0].Name = strings.Repeat("\x01", 12000); return h }(), "regions[0] alone is"},
	}
	for _, c := range cases {
		err := CheckLayout(c.h)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: CheckLayout = %v, want %q", c.name, err, c.want)
		}
		if _, err := Listen(filepath.Join(t.TempDir(), "s"), layoutBackend{c.h}, Options{}); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Listen = %v, want %q", c.name, err, c.want)
		}
	}
	// Regions off huge-page boundaries (64 KiB chunks) in a hugetlb backing.
	hh := Hello{Backing: BackingHugetlb, PageSize: 2 << 20, ChunkSize: 64 << 10, FileSize: 4 << 20,
		Regions: []Region{{Name: "a", Size: 2 << 20, Length: 4096}, {Name: "b", Offset: 64 << 10, Size: 2 << 20, Length: 4096}}}
	if _, err := Listen(filepath.Join(t.TempDir(), "s"), layoutBackend{hh}, Options{}); err == nil ||
		!strings.Contains(err.Error(), "regions[1].offset: 65536 is not a multiple of page_size 2097152 (regions must start on huge-page boundaries: load the snapshot into shmem") {
		t.Errorf("misaligned hugetlb layout: Listen = %v", err)
	}
	if err := CheckLayout(one(1999, 4096)); err != nil {
		t.Errorf("1999 regions under a limit of 3000: %v", err)
	}
}

type layoutBackend struct{ h Hello }

func (b layoutBackend) Hello() Hello          { return b.h }
func (layoutBackend) BackingFile() *uffd.File { return nil }
func (layoutBackend) AttachView(u *uffd.FD, _ []Range, _ string) (View, error) {
	u.Close()
	return nil, errors.New("not served")
}

// TestMapCountHint: an mmap ENOMEM while mapping many regions names
// vm.max_map_count and the fix; other errors and few regions get no hint.
func TestMapCountHint(t *testing.T) {
	if h := mapCountHint(unix.ENOMEM, 5000); !strings.Contains(h, "this target maps 5000 regions") || !strings.Contains(h, "sysctl -w vm.max_map_count=N") {
		t.Errorf("hint %q", h)
	}
	if h := mapCountHint(unix.ENOMEM, 10); h != "" {
		t.Errorf("10 regions: hint %q", h)
	}
	if h := mapCountHint(unix.EINVAL, 5000); h != "" {
		t.Errorf("EINVAL: hint %q", h)
	}
}
