package vm

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	for s, want := range map[string]uint64{"512M": 512 << 20, "1G": 1 << 30, "1g": 1 << 30, "4096": 4096, "64k": 64 << 10, "2T": 2 << 40, "100B": 100} {
		if got, err := parseSize(s); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", s, got, err, want)
		}
	}
	for _, s := range []string{"", "M", "12Q", "-1M", "99999999999999999999G"} {
		if _, err := parseSize(s); err == nil {
			t.Errorf("parseSize(%q) accepted", s)
		}
	}
}

func TestQemuOptsRoundTrip(t *testing.T) {
	for _, s := range []string{
		"memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/a,,b,share=on",
		"qom-type=memory-backend-file,id=m0,size=1G,mem-path=/x",
		"pc,accel=tcg",
	} {
		if got := parseQemuOpts(s).String(); got != s {
			t.Errorf("round trip %q -> %q", s, got)
		}
	}
	o := parseQemuOpts("memory-backend-file,id=mem,mem-path=/a,,b")
	if v, _ := o.get("mem-path"); v != "/a,b" || o.typ() != "memory-backend-file" {
		t.Errorf("mem-path %q type %q", v, o.typ())
	}
}

func TestRewriteArgs(t *testing.T) {
	regs := []ramRegion{{ID: "mem", Size: 512 << 20, Marker: "/run/x/ram0"}}
	user := []string{"-nodefaults", "-object", "memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/old.ram,share=on,prealloc=off",
		"-machine", "memory-backend=mem", "-object", "rng-random,id=rng0,filename=/dev/urandom", "-kernel", "/boot/vmlinuz"}
	got, err := rewriteArgs(user, regs, false, "/run/x/qmp.sock")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"-nodefaults", "-object", "memory-backend-file,id=mem,size=512M,mem-path=/run/x/ram0,share=on,prealloc=off",
		"-machine", "memory-backend=mem", "-object", "rng-random,id=rng0,filename=/dev/urandom", "-kernel", "/boot/vmlinuz",
		"-incoming", "defer", "-S", "-qmp", "unix:/run/x/qmp.sock,server=on,wait=off"}
	if !slices.Equal(got, want) {
		t.Errorf("rewritten:\n got %q\nwant %q", got, want)
	}
	// --private: share=off; a missing size= is filled in.
	got, err = rewriteArgs([]string{"--object", "memory-backend-file,id=mem,mem-path=/a,share=on"}, regs, true, "/q")
	if err != nil || got[1] != "memory-backend-file,id=mem,mem-path=/run/x/ram0,share=off,size=512M" {
		t.Errorf("private: %q %v", got, err)
	}

	bad := map[string]struct {
		args []string
		err  error
		msg  string
	}{
		"size":      {[]string{"-object", "memory-backend-file,id=mem,size=256M,mem-path=/a"}, ErrRAMSize, "size=512M"},
		"missing":   {[]string{"-m", "512M"}, ErrArgs, "-object memory-backend-file,id=mem,size=512M"},
		"ram type":  {[]string{"-object", "memory-backend-ram,id=mem,size=512M"}, ErrArgs, "is a memory-backend-ram"},
		"extra":     {[]string{"-object", "memory-backend-file,id=mem,size=512M,mem-path=/a", "-object", "memory-backend-file,id=other,size=1M,mem-path=/b"}, ErrArgs, `no RAM region "other"`},
		"incoming":  {[]string{"-incoming", "tcp:0:4444"}, ErrArgs, "adds -incoming defer itself"},
		"daemonize": {[]string{"-daemonize"}, ErrArgs, "-daemonize"},
		"mem-path":  {[]string{"-m", "512M", "-mem-path", "/dev/hugepages"}, ErrArgs, "memory-backend-file"},
		"bad size":  {[]string{"-object", "memory-backend-file,id=mem,size=lots,mem-path=/a"}, ErrArgs, "not a size"},
	}
	for name, c := range bad {
		_, err := rewriteArgs(c.args, regs, false, "/q")
		if !errors.Is(err, c.err) || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: %v, want %v mentioning %q", name, err, c.err, c.msg)
		}
	}
}
