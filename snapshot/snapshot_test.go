package snapshot

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/memgen"
)

const childEnv = "UFFDRESTORE_SNAPSHOT_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		childMain()
		return
	}
	// The runtime's poller (epoll + eventfd) opens lazily: start it first.
	if r, w, err := os.Pipe(); err == nil {
		r.Close()
		w.Close()
	}
	before := openFDs()
	code := m.Run()
	if after := openFDs(); code == 0 && after > before {
		fmt.Fprintf(os.Stderr, "FAIL: %d file descriptors leaked (%d open before the tests, %d after)\n", after-before, before, after)
		code = 1
	}
	os.Exit(code)
}

// openFDs counts this process's open file descriptors.
func openFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return len(ents)
}

// pattern is the byte at address a in the child's test mapping.
func pattern(a uint64) byte { return byte(a>>12) ^ byte(a) ^ byte(a>>20)*7 }

const (
	childMapSize = 8 << 20
	childHoleLen = 1 << 20 // memfd size of the "hole" mapping; mapped twice that
)

// childMain maps an 8 MiB memfd filled with pattern(addr), and a second
// mapping whose second half lies beyond its memfd's end (unreadable), prints
// both addresses, then waits for stdin to close.
func childMain() {
	mapfd := func(name string, size, mapLen int) []byte {
		fd, err := unix.MemfdCreate(name, 0)
		if err != nil {
			panic(err)
		}
		if err := unix.Ftruncate(fd, int64(size)); err != nil {
			panic(err)
		}
		b, err := unix.Mmap(fd, 0, mapLen, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			panic(err)
		}
		return b
	}
	b := mapfd("uffdsnap-test", childMapSize, childMapSize)
	base := uint64(uintptr(unsafePointer(b)))
	for i := range b {
		b[i] = pattern(base + uint64(i))
	}
	h := mapfd("uffdsnap-hole", childHoleLen, 2*childHoleLen)
	for i := 0; i < childHoleLen; i++ {
		h[i] = 0xAB
	}
	fmt.Printf("%x %x\n", base, uint64(uintptr(unsafePointer(h))))
	io.Copy(io.Discard, os.Stdin)
}

// image is the test image of n bytes for seed (memgen.Image).
func image(n int, seed uint64) []byte { return memgen.Image(n, seed) }

func openBytes(t testing.TB, snap []byte) *format.Reader {
	t.Helper()
	r, err := format.NewReader(bytes.NewReader(snap), int64(len(snap)))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func extract(t testing.TB, snap []byte, region string) []byte {
	t.Helper()
	var out bytes.Buffer
	if err := Extract(context.Background(), openBytes(t, snap), &out, region); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func TestCreateExtractSizes(t *testing.T) {
	const cs = format.MinChunkSize
	sizes := []int{0, 1, 4095, 4096, 4097, cs - 1, cs, cs + 1, 6<<20 + 3}
	dir := t.TempDir()
	for _, codec := range []format.Codec{format.CodecZstd, format.CodecS2, format.CodecRaw} {
		for _, n := range sizes {
			img := image(n, uint64(n))
			opts := Options{WriterOptions: format.WriterOptions{ChunkSize: cs, Codec: codec, Workers: 2}}
			// From a file.
			p := filepath.Join(dir, "img")
			if err := os.WriteFile(p, img, 0o644); err != nil {
				t.Fatal(err)
			}
			var snap bytes.Buffer
			var last uint64
			opts.Progress = func(done, total uint64) {
				if total != uint64(n) || done < last {
					t.Errorf("progress %d/%d after %d", done, total, last)
				}
				last = done
			}
			if _, err := CreateFromFile(context.Background(), p, &snap, opts); err != nil {
				t.Fatal(err)
			}
			if last != uint64(n) {
				t.Errorf("progress ended at %d, want %d", last, n)
			}
			if got := extract(t, snap.Bytes(), ""); !bytes.Equal(got, img) {
				t.Fatalf("%s/%d from file: extracted bytes differ", codec, n)
			}
			if errs := Verify(context.Background(), openBytes(t, snap.Bytes()), 2); len(errs) != 0 {
				t.Fatalf("%s/%d: verify: %v", codec, n, errs)
			}
			// From a pipe (stdin).
			pr, pw, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			go func() { pw.Write(img); pw.Close() }()
			opts.Progress = nil
			var snap2 bytes.Buffer
			if _, err := CreateFromReader(context.Background(), pr, &snap2, opts); err != nil {
				t.Fatal(err)
			}
			pr.Close()
			if got := extract(t, snap2.Bytes(), "image"); !bytes.Equal(got, img) {
				t.Fatalf("%s/%d from pipe: extracted bytes differ", codec, n)
			}
		}
	}
}

func TestCreateFromPID(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	f := strings.Fields(line)
	base, _ := strconv.ParseUint(f[0], 16, 64)
	hole, _ := strconv.ParseUint(f[1], 16, 64)

	var warns []string
	var mu sync.Mutex
	opts := Options{
		WriterOptions: format.WriterOptions{ChunkSize: 256 << 10, Codec: format.CodecS2},
		Regions:       []string{"uffdsnap-test", "*uffdsnap-hole*"},
		Warn:          func(m string) { mu.Lock(); warns = append(warns, m); mu.Unlock() },
	}
	var snap bytes.Buffer
	if _, err := CreateFromPID(context.Background(), cmd.Process.Pid, &snap, opts); err != nil {
		t.Fatal(err)
	}
	r := openBytes(t, snap.Bytes())
	rs := r.Regions()
	if len(rs) == 2 && strings.Contains(rs[0].Name, "hole") {
		rs[0], rs[1] = rs[1], rs[0] // regions are in address order
	}
	if len(rs) != 2 {
		t.Fatalf("regions = %+v, want the test mapping and the readable half of the hole mapping", rs)
	}
	if rs[0].Addr != base || rs[0].Length != childMapSize || !strings.Contains(rs[0].Name, "uffdsnap-test") || rs[0].Prot != format.ProtRead|format.ProtWrite {
		t.Errorf("region 0 = %+v, want addr %#x length %d", rs[0], base, childMapSize)
	}
	if rs[1].Addr != hole || rs[1].Length != childHoleLen {
		t.Errorf("region 1 = %+v, want addr %#x length %d (the readable half)", rs[1], hole, childHoleLen)
	}
	if len(warns) != 1 || !strings.Contains(warns[0], "unreadable") {
		t.Errorf("warnings = %q, want one about the unreadable half", warns)
	}
	var out bytes.Buffer
	if err := Extract(context.Background(), r, &out, rs[0].Name); err != nil {
		t.Fatal(err)
	}
	got := out.Bytes()
	if len(got) != childMapSize {
		t.Fatalf("extracted %d bytes", len(got))
	}
	for i, b := range got {
		if b != pattern(base+uint64(i)) {
			t.Fatalf("byte %d (addr %#x) = %#x, want %#x", i, base+uint64(i), b, pattern(base+uint64(i)))
		}
	}
	md := r.Metadata()
	if md.Extra["pid"] != strconv.Itoa(cmd.Process.Pid) || !strings.HasPrefix(md.Source, "pid ") {
		t.Errorf("metadata = %+v", md)
	}

	// No match: a clear error.
	_, err = CreateFromPID(context.Background(), cmd.Process.Pid, io.Discard, Options{Regions: []string{"no-such-mapping"}})
	if !errors.Is(err, ErrNoRegions) {
		t.Errorf("no match: err = %v", err)
	}
}

func TestParseMaps(t *testing.T) {
	in := `00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
00e03000-00e24000 rw-p 00000000 00:00 0                                  [heap]
35b1800000-35b1820000 r-xp 00000000 08:02 135522  /usr/lib/my lib.so
7fff4a3b9000-7fff4a3da000 rw-p 00000000 00:00 0                          [stack]
7fff4a3ff000-7fff4a401000 r-xp 00000000 00:00 0                          [vdso]
7f0000000000-7f0000001000 ---p 00000000 00:00 0
7f0000001000-7f0000002000 rw-p 00000000 00:00 0
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
`
	ms, err := ParseMaps(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 8 || ms[2].Path != "/usr/lib/my lib.so" || ms[1].Name() != "[heap]" || ms[6].Name() != "anon" {
		t.Fatalf("parsed %+v", ms)
	}
	sel := SelectMappings(ms, nil)
	var names []string
	for _, m := range sel {
		names = append(names, m.Name())
	}
	if got := strings.Join(names, ","); got != "/usr/bin/dbus-daemon,[heap],/usr/lib/my lib.so,[stack],anon" {
		t.Errorf("selected %s", got)
	}
	if sel := SelectMappings(ms, []string{"[heap]", "*.so"}); len(sel) != 2 {
		t.Errorf("filter selected %d", len(sel))
	}
	if _, err := ParseMaps(strings.NewReader("garbage\n")); err == nil {
		t.Error("garbage parsed")
	}
}

func multiRegionSnap(t testing.TB) []byte {
	var buf bytes.Buffer
	w, err := format.NewWriter(&buf, format.WriterOptions{ChunkSize: format.MinChunkSize, Metadata: format.Metadata{Source: "test", Created: time.Unix(1700000000, 0)}})
	if err != nil {
		t.Fatal(err)
	}
	for i, name := range []string{"[heap]", "/lib/libc.so", "[stack]"} {
		w.BeginRegion(name, uint64(0x10000000*(i+1)), format.ProtRead|format.ProtWrite)
		w.Write(image(300000+i*1000, uint64(i)))
		w.Write(make([]byte, 2*format.MinChunkSize))
		w.EndRegion()
	}
	w.AddProfile(format.Profile{Name: "p", Entries: []format.ProfileEntry{{Chunk: 1}}})
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestInfo(t *testing.T) {
	snap := multiRegionSnap(t)
	rep := Info(openBytes(t, snap))
	if len(rep.Regions) != 3 || rep.Regions[1].Name != "/lib/libc.so" || rep.Regions[1].Prot != "rw-" {
		t.Errorf("regions %+v", rep.Regions)
	}
	if rep.Codecs["zero"] < 6 || rep.ZeroChunks != rep.Codecs["zero"] || rep.Ratio <= 1 || rep.ZeroFraction <= 0 {
		t.Errorf("report %+v", rep)
	}
	if rep.Metadata.Source != "test" || rep.Metadata.Created == nil || len(rep.Profiles) != 1 {
		t.Errorf("metadata/profiles %+v %+v", rep.Metadata, rep.Profiles)
	}
	js, err := json.Marshal(rep)
	if err != nil || !bytes.Contains(js, []byte(`"chunk_size":65536`)) {
		t.Errorf("json %s %v", js, err)
	}
	var text bytes.Buffer
	rep.Regions[2].Name = "evil\x1b[2J"
	if err := rep.WriteText(&text); err != nil || !strings.Contains(text.String(), "/lib/libc.so") ||
		strings.Contains(text.String(), "\x1b") || !strings.Contains(text.String(), `"evil\x1b[2J"`) {
		t.Errorf("text %q %v", text.String(), err)
	}
}

func TestExtractRegion(t *testing.T) {
	snap := multiRegionSnap(t)
	got := extract(t, snap, "/lib/libc.so")
	want := append(image(301000, 1), make([]byte, 2*format.MinChunkSize)...)
	if !bytes.Equal(got, want) {
		t.Error("region bytes differ")
	}
	if got := extract(t, snap, "*tack*"); len(got) != 302000+2*format.MinChunkSize {
		t.Errorf("glob: %d bytes", len(got))
	}
	err := Extract(context.Background(), openBytes(t, snap), io.Discard, "nope")
	if !errors.Is(err, ErrNoSuchRegion) || !strings.Contains(err.Error(), "[heap]") {
		t.Errorf("err = %v", err)
	}
}

// TestFlippedByteFound flips one byte at many places of a snapshot: opening
// or Verify must fail and name the place.
func TestFlippedByteFound(t *testing.T) {
	snap := multiRegionSnap(t)
	r := openBytes(t, snap)
	step := len(snap)/400 + 1
	for i := 0; i < len(snap); i += step {
		b := bytes.Clone(snap)
		b[i] ^= 0x20
		fr, err := format.NewReader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			var ce *format.CorruptError
			if !errors.As(err, &ce) || ce.Offset < 0 {
				t.Fatalf("byte %d: error %v does not name an offset", i, err)
			}
			continue
		}
		errs := Verify(context.Background(), fr, 2)
		if len(errs) != 1 {
			t.Fatalf("byte %d: verify found %d bad chunks, want 1", i, len(errs))
		}
		e := errs[0]
		c := r.Chunk(e.Chunk)
		if uint64(i) < c.Offset || uint64(i) >= c.Offset+uint64(c.StoredLen) {
			t.Errorf("byte %d: blamed chunk %d at [%#x,+%d)", i, e.Chunk, c.Offset, c.StoredLen)
		}
		if e.RegionName == "" || !errors.Is(e.Err, format.ErrChecksum) || !strings.Contains(e.Error(), "chunk ") {
			t.Errorf("byte %d: %v", i, e)
		}
	}
}

func TestVerifyCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	errs := Verify(ctx, openBytes(t, multiRegionSnap(t)), 2)
	if len(errs) == 0 || !errors.Is(errs[len(errs)-1].Err, context.Canceled) {
		t.Errorf("errs = %v", errs)
	}
}
