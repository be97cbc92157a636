package vmguest

import (
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
)

// KernelEnv names the guest kernel for tests and the demo.
const KernelEnv = "UFFDRESTORE_VM_KERNEL"

// defaultKernelGlob is where .ci/run extracts Debian's linux-image package.
const defaultKernelGlob = "/var/cache/uffdrestore-vm/x/boot/vmlinuz-*"

// Find returns qemu-system-x86_64, a guest kernel and a static busybox, or
// says which is missing and how to get it.
func Find() (qemu, kernel, busybox string, err error) {
	qemu, err = exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", "", "", fmt.Errorf("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
	}
	kernel = os.Getenv(KernelEnv)
	if kernel == "" {
		m, _ := filepath.Glob(defaultKernelGlob)
		sort.Strings(m)
		if len(m) == 0 {
			return "", "", "", fmt.Errorf("no guest kernel: set %s to a vmlinuz, or extract Debian's linux-image package "+
				"(apt-get download $(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: //p'); dpkg-deb -x linux-image-*.deb /var/cache/uffdrestore-vm/x)", KernelEnv)
		}
		kernel = m[len(m)-1]
	}
	if _, err := os.Stat(kernel); err != nil {
		return "", "", "", fmt.Errorf("guest kernel: %w", err)
	}
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if isStatic(p) {
			busybox = p
			break
		}
	}
	if busybox == "" {
		return "", "", "", fmt.Errorf("no static busybox: apt-get install busybox-static")
	}
	return qemu, kernel, busybox, nil
}

// Machine is a guest's QEMU command line.
type Machine struct {
	Kernel, Initrd string
	RAM            uint64 // bytes
	MemPath        string
	Share          bool
	Serial         string // unix socket for the serial console
	QMP            string // unix socket for QMP ("" = none)
}

// Args returns the QEMU arguments (without the program).
func (m Machine) Args() []string {
	share := "off"
	if m.Share {
		share = "on"
	}
	a := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-machine", "pc,accel=tcg", "-smp", "1",
		"-object", fmt.Sprintf("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=%s", m.RAM>>20, m.MemPath, share),
		"-machine", "memory-backend=mem",
		"-kernel", m.Kernel, "-initrd", m.Initrd, "-append", KernelCmdline,
		"-serial", "unix:" + m.Serial + ",server=on,wait=off",
	}
	if m.QMP != "" {
		a = append(a, "-qmp", "unix:"+m.QMP+",server=on,wait=off")
	}
	return a
}

// isStatic reports whether p is an ELF executable without a program
// interpreter (statically linked: it runs in the initramfs alone).
func isStatic(p string) bool {
	f, err := elf.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, ph := range f.Progs {
		if ph.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}
