package attach

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// mappingHarness is a C program against ur_client.c: it connects
// (ur_connect), calls ur_attach_mapping with every kind of bad argument, then
// attaches two good mappings of region 1 (private at a fixed address, shared
// anywhere) and writes what both read to argv[2]. It prints "case=rc" lines.
// It waits 0.7 s before the first good attach, past the server's handshake
// timeout (the test sets 0.3 s): the session connects again for it.
const mappingHarness = `#define _GNU_SOURCE
#include "ur_client.h"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#define T(name, call) printf("%s=%d\n", name, (call))
int main(int argc, char **argv) {
	struct ur_session *s;
	if (argc != 3 || ur_connect(argv[1], NULL, &s) < 0) {
		printf("connect: %s\n", ur_session_error(NULL));
		return 1;
	}
	int fd = ur_session_backing_fd(s);
	size_t ps = ur_session_page_size(s);
	const struct ur_region *r = ur_session_region(s, 1);
	size_t len = r->size;
	off_t off = (off_t)r->offset;
	unsigned char *sh = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, off);
	unsigned char *pv = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, off);
	unsigned char *anon = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *wrong = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0); /* region 0's offset */
	unsigned char *holed = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, off);
	if (sh == MAP_FAILED || pv == MAP_FAILED || anon == MAP_FAILED || wrong == MAP_FAILED || holed == MAP_FAILED)
		return 2;
	munmap(holed + ps, ps);
	T("badindex", ur_attach_mapping(s, sh, len, ur_session_nregions(s), 0, MAP_SHARED));
	T("emptyregion", ur_attach_mapping(s, sh, ps, 4, 0, MAP_SHARED));
	T("misaligned_addr", ur_attach_mapping(s, sh + 1, ps, 1, 0, MAP_SHARED));
	T("misaligned_len", ur_attach_mapping(s, sh, ps + 1, 1, 0, MAP_SHARED));
	T("misaligned_off", ur_attach_mapping(s, sh, ps, 1, 1, MAP_SHARED));
	T("zero_len", ur_attach_mapping(s, sh, 0, 1, 0, MAP_SHARED));
	T("past_end", ur_attach_mapping(s, sh, len + ps, 1, 0, MAP_SHARED));
	T("past_end_off", ur_attach_mapping(s, sh, len, 1, ps, MAP_SHARED));
	T("null", ur_attach_mapping(s, NULL, ps, 1, 0, MAP_SHARED));
	T("anon", ur_attach_mapping(s, anon, len, 1, 0, MAP_PRIVATE));
	T("wrong_offset", ur_attach_mapping(s, wrong, len, 1, 0, MAP_SHARED));
	T("wrong_flags", ur_attach_mapping(s, sh, len, 1, 0, MAP_PRIVATE));
	T("bad_flags", ur_attach_mapping(s, sh, len, 1, 0, 0));
	T("hole", ur_attach_mapping(s, holed, len, 1, 0, MAP_SHARED));
	struct ur_mapping two[2] = { { pv, len, 1, 0, MAP_PRIVATE }, { pv + ps, ps, 1, ps, MAP_PRIVATE } };
	T("overlap", ur_attach_mappings(s, two, 2));
	T("none", ur_attach_mappings(s, two, 0));
	printf("last_error=%s\n", ur_session_error(s));
	usleep(700 * 1000); /* past the server's handshake timeout: the first attach connects again */
	T("private", ur_attach_mapping(s, pv, len, 1, 0, MAP_PRIVATE));
	T("shared", ur_attach_mapping(s, sh, len, 1, 0, MAP_SHARED));
	T("again", ur_attach_mapping(s, sh, len, 1, 0, MAP_SHARED));
	pv[0] ^= 0xff; /* a private copy: the shared one keeps the snapshot's byte */
	pv[0] ^= 0xff;
	FILE *f = fopen(argv[2], "w");
	static unsigned char buf[1 << 20];
	memcpy(buf, pv, len);
	fwrite(buf, 1, r->length, f);
	memcpy(buf, sh, len);
	fwrite(buf, 1, r->length, f);
	fclose(f);
	T("detach", ur_detach(s));
	return 0;
}
`

// TestAttachMappingC: ur_attach_mapping refuses every bad range with its
// named code before registering anything, the session stays usable, and two
// good mappings of one region (private at an address the program chose,
// shared) read the snapshot's bytes.
func TestAttachMappingC(t *testing.T) {
	requireUffd(t, false)
	buildTarget(t) // skips without gcc
	dir := t.TempDir()
	src := filepath.Join(dir, "h.c")
	os.WriteFile(src, []byte(mappingHarness), 0o644)
	exe := filepath.Join(dir, "h")
	args := append(append([]string{}, cflags...), "-I"+csrcDir(t), "-o", exe, src, filepath.Join(csrcDir(t), "ur_client.c"))
	if b, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
		t.Fatalf("gcc %v: %v\n%s", args, err, b)
	}
	b := newFakeBackend(t, false, append(defaultRegions(4096), regionSpec{"empty", 0, 0}))
	_, sock := listen(t, b, Options{HandshakeTimeout: 300 * time.Millisecond})
	out := filepath.Join(dir, "out")
	got, err := exec.Command(exe, sock, out).CombinedOutput()
	if err != nil {
		t.Fatalf("harness: %v\n%s", err, got)
	}
	const (
		noRegion   = "-10011"
		mapRange   = "-10012"
		notBacking = "-10013"
	)
	want := map[string]string{
		"badindex": noRegion, "emptyregion": noRegion,
		"misaligned_addr": mapRange, "misaligned_len": mapRange, "misaligned_off": mapRange, "zero_len": mapRange,
		"past_end": mapRange, "past_end_off": mapRange, "null": mapRange,
		"anon": notBacking, "wrong_offset": notBacking, "wrong_flags": notBacking, "hole": notBacking,
		"bad_flags": "-" + strconv.Itoa(22), "overlap": "-" + strconv.Itoa(16), "none": "-22",
		"private": "0", "shared": "0", "again": "-16", "detach": "0",
	}
	lines := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(got)), "\n") {
		k, v, _ := strings.Cut(l, "=")
		lines[k] = v
	}
	for k, v := range want {
		if lines[k] != v {
			t.Errorf("%s: got %q, want %s", k, lines[k], v)
		}
	}
	if t.Failed() {
		t.Logf("harness output:\n%s", got)
	}
	r := b.hello.Regions[1]
	img := b.image[r.Offset : r.Offset+r.Length]
	dump, _ := os.ReadFile(out)
	if !bytes.Equal(dump, append(append([]byte{}, img...), img...)) {
		t.Errorf("the two mappings read %d bytes that are not region 1 twice", len(dump))
	}
}
