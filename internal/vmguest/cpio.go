// Package vmguest builds a tiny Linux guest for QEMU tests and the VM demo:
// an initramfs (cpio newc, written here) holding a static busybox and an
// init script that writes a deterministic pattern into guest memory (a file
// in a tmpfs), runs a counter and answers commands on the serial console.
package vmguest

import (
	"bytes"
	"fmt"
	"io"
	"os"
)

// cpioWriter writes a cpio "newc" archive, the format the kernel unpacks
// into its initramfs.
type cpioWriter struct {
	w   io.Writer
	ino int
	err error
}

const (
	modeDir  = 0o040000
	modeReg  = 0o100000
	modeChr  = 0o020000
	modeLink = 0o120000
)

func pad4(n int) int { return (4 - n%4) % 4 }

func (c *cpioWriter) entry(name string, mode uint32, data []byte, rmaj, rmin int) {
	if c.err != nil {
		return
	}
	c.ino++
	nlink := 1
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmaj, rmin, len(name)+1, 0)
	var b bytes.Buffer
	b.WriteString(hdr)
	b.WriteString(name)
	b.WriteByte(0)
	b.Write(make([]byte, pad4(len(hdr)+len(name)+1)))
	b.Write(data)
	b.Write(make([]byte, pad4(len(data))))
	_, c.err = c.w.Write(b.Bytes())
}

func (c *cpioWriter) dir(name string)                      { c.entry(name, modeDir|0o755, nil, 0, 0) }
func (c *cpioWriter) file(name string, m uint32, d []byte) { c.entry(name, modeReg|m, d, 0, 0) }
func (c *cpioWriter) chr(name string, maj, min int)        { c.entry(name, modeChr|0o600, nil, maj, min) }
func (c *cpioWriter) close() error {
	c.entry("TRAILER!!!", 0, nil, 0, 0)
	return c.err
}

// Initramfs returns an initramfs (uncompressed cpio newc) with the static
// busybox at busybox as /bin/busybox and the guest's /init.
func Initramfs(busybox string, cfg Config) ([]byte, error) {
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return nil, fmt.Errorf("guest: busybox: %w (install busybox-static)", err)
	}
	var out bytes.Buffer
	c := &cpioWriter{w: &out}
	for _, d := range []string{"bin", "dev", "proc", "sys", "mnt", "run", "tmp"} {
		c.dir(d)
	}
	c.chr("dev/console", 5, 1)
	c.chr("dev/ttyS0", 4, 64)
	c.file("bin/busybox", 0o755, bb)
	c.file("init", 0o755, []byte(cfg.initScript()))
	if err := c.close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}
