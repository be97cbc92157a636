package vmguest

import (
	"bytes"
	"crypto/md5"
	"encoding/hex"
	"strconv"
	"strings"
	"testing"
)

func TestPattern(t *testing.T) {
	c := Config{PatternLines: 12345}
	var b bytes.Buffer
	for i := 1; i <= c.PatternLines; i++ {
		b.WriteString(strconv.Itoa(i) + "\n")
	}
	if got := c.PatternBytes(); got != int64(b.Len()) {
		t.Errorf("PatternBytes %d, want %d", got, b.Len())
	}
	sum := md5.Sum(b.Bytes())
	if got := c.PatternMD5(); got != hex.EncodeToString(sum[:]) {
		t.Errorf("PatternMD5 %s", got)
	}
	w := b.Bytes()
	copy(w, "hello\n")
	sum = md5.Sum(w)
	if got := c.WrittenMD5("hello"); got != hex.EncodeToString(sum[:]) {
		t.Errorf("WrittenMD5 %s", got)
	}
	if !strings.Contains(c.initScript(), "seq 1 12345 > /mnt/pattern") {
		t.Error("init script does not write the pattern")
	}
}

// The archive parses as cpio newc: magic, hex fields, 4-byte alignment,
// the files and modes the kernel needs, and the trailer last.
func TestInitramfsIsNewc(t *testing.T) {
	ird, err := Initramfs("/bin/sh", Config{PatternLines: 10})
	if err != nil {
		t.Fatal(err)
	}
	type ent struct {
		mode, size, rmaj, rmin uint64
		data                   []byte
	}
	got := map[string]ent{}
	var last string
	for off := 0; off < len(ird); {
		h := ird[off:]
		if len(h) < 110 || string(h[:6]) != "070701" {
			t.Fatalf("offset %d: no newc header", off)
		}
		f := func(i int) uint64 {
			v, err := strconv.ParseUint(string(h[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("offset %d field %d: %v", off, i, err)
			}
			return v
		}
		mode, size, rmaj, rmin, nsz := f(1), f(6), f(9), f(10), f(11)
		name := string(h[110 : 110+nsz-1])
		d := 110 + int(nsz)
		d += (4 - d%4) % 4
		got[name] = ent{mode, size, rmaj, rmin, h[d : d+int(size)]}
		last = name
		d += int(size)
		d += (4 - d%4) % 4
		off += d
	}
	if last != "TRAILER!!!" {
		t.Errorf("last entry %q", last)
	}
	if e := got["init"]; e.mode != 0o100755 || !bytes.HasPrefix(e.data, []byte("#!/bin/busybox sh")) {
		t.Errorf("init: mode %o, %.20q", e.mode, e.data)
	}
	if e := got["dev/console"]; e.mode != 0o020600 || e.rmaj != 5 || e.rmin != 1 {
		t.Errorf("dev/console %+v", e)
	}
	if e := got["bin/busybox"]; e.mode != 0o100755 || e.size == 0 {
		t.Errorf("bin/busybox %+v", e)
	}
	if e := got["mnt"]; e.mode != 0o040755 {
		t.Errorf("mnt %+v", e)
	}
}

func TestIsStatic(t *testing.T) {
	if isStatic("/bin/sh") {
		t.Error("/bin/sh (dynamically linked) reported static")
	}
	if isStatic("/etc/passwd") {
		t.Error("a text file reported static")
	}
}
