package snapshot

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/uffdrestore/uffdrestore/format"
)

// Mapping is one line of /proc/PID/maps.
type Mapping struct {
	Start, End uint64
	Perms      string // e.g. "rw-p"
	Offset     uint64
	Inode      uint64
	Path       string // "" for anonymous mappings
}

// Name is the region name used for the mapping: its path, a pseudo name
// like [heap] or [stack], or "anon".
func (m Mapping) Name() string {
	if m.Path == "" {
		return "anon"
	}
	return m.Path
}

// Prot returns the mapping's protection as PROT_* bits.
func (m Mapping) Prot() uint32 {
	var p uint32
	if strings.Contains(m.Perms, "r") {
		p |= format.ProtRead
	}
	if strings.Contains(m.Perms, "w") {
		p |= format.ProtWrite
	}
	if strings.Contains(m.Perms, "x") {
		p |= format.ProtExec
	}
	return p
}

// ParseMaps parses the contents of a /proc/PID/maps file.
func ParseMaps(r io.Reader) ([]Mapping, error) {
	var ms []Mapping
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for line := 1; sc.Scan(); line++ {
		// start-end perms offset dev inode [path]
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			return nil, fmt.Errorf("maps line %d: %q: too few fields", line, sc.Text())
		}
		se := strings.SplitN(f[0], "-", 2)
		if len(se) != 2 {
			return nil, fmt.Errorf("maps line %d: bad range %q", line, f[0])
		}
		var m Mapping
		var err1, err2, err3, err4 error
		m.Start, err1 = strconv.ParseUint(se[0], 16, 64)
		m.End, err2 = strconv.ParseUint(se[1], 16, 64)
		m.Perms = f[1]
		m.Offset, err3 = strconv.ParseUint(f[2], 16, 64)
		m.Inode, err4 = strconv.ParseUint(f[4], 10, 64)
		if err := errors.Join(err1, err2, err3, err4); err != nil || m.End < m.Start {
			return nil, fmt.Errorf("maps line %d: %q: malformed", line, sc.Text())
		}
		if len(f) > 5 {
			// The path may contain spaces; it starts at the 6th field.
			text := sc.Text()
			idx := strings.Index(text, f[5])
			m.Path = strings.TrimRight(text[idx:], " ")
		}
		ms = append(ms, m)
	}
	return ms, sc.Err()
}

// special reports whether a mapping is never snapshotted: kernel-provided
// pages that a restored process gets from its own kernel ([vvar],
// [vvar_vclock], [vsyscall] are not even readable through /proc/PID/mem;
// [vdso] is readable but is the kernel's code, and a restore must not
// replace it), and device mappings, whose reads can have side effects.
func special(m Mapping) bool {
	switch m.Path {
	case "[vvar]", "[vvar_vclock]", "[vsyscall]", "[vdso]":
		return true
	}
	if strings.HasPrefix(m.Path, "/dev/") && m.Path != "/dev/zero" &&
		!strings.HasPrefix(m.Path, "/dev/shm/") && !strings.HasPrefix(m.Path, "/dev/hugepages/") {
		return true
	}
	return false
}

// MatchRegion reports whether name is selected by the filters: empty
// filters select everything; otherwise a filter matches as a substring or,
// failing that, as a path.Match glob against the name or its base name.
func MatchRegion(name string, filters []string) bool {
	if len(filters) == 0 {
		return true
	}
	for _, f := range filters {
		if f == "" {
			continue
		}
		if strings.Contains(name, f) {
			return true // also makes "[heap]" work although it looks like a glob
		}
		if strings.ContainsAny(f, "*?[") {
			if ok, _ := path.Match(f, name); ok {
				return true
			}
			if ok, _ := path.Match(f, path.Base(name)); ok {
				return true
			}
		}
	}
	return false
}

// SelectMappings returns the readable, non-special mappings that match
// the filters.
func SelectMappings(ms []Mapping, filters []string) []Mapping {
	var out []Mapping
	for _, m := range ms {
		if !strings.HasPrefix(m.Perms, "r") || special(m) || m.End == m.Start {
			continue
		}
		if MatchRegion(m.Name(), filters) {
			out = append(out, m)
		}
	}
	return out
}

// CreateFromPID snapshots the memory of a running process: one region per
// readable mapping of /proc/PID/maps (filtered by opts.Regions), read
// through /proc/PID/mem. Ranges that cannot be read (EIO, e.g. guard pages
// or device memory) are skipped with a warning through opts.Warn; the
// region is split around them. The process keeps running while it is
// read: stop it first (kill -STOP) for a consistent image.
func CreateFromPID(ctx context.Context, pid int, w io.Writer, opts Options) (_ format.WriterStats, err error) {
	if pid <= 0 {
		return format.WriterStats{}, fmt.Errorf("snapshot: bad pid %d", pid)
	}
	proc := fmt.Sprintf("/proc/%d", pid)
	mf, err := os.Open(proc + "/maps")
	if err != nil {
		return format.WriterStats{}, fmt.Errorf("read memory map of pid %d: %w (is the process running?)", pid, err)
	}
	all, err := ParseMaps(mf)
	mf.Close()
	if err != nil {
		return format.WriterStats{}, fmt.Errorf("read memory map of pid %d: %w", pid, err)
	}
	sel := SelectMappings(all, opts.Regions)
	if len(sel) == 0 {
		return format.WriterStats{}, fmt.Errorf("%w: pid %d has %d mappings, none readable and matching %q", ErrNoRegions, pid, len(all), opts.Regions)
	}
	mem, err := os.Open(proc + "/mem")
	if err != nil {
		return format.WriterStats{}, fmt.Errorf("open memory of pid %d: %w (needs ptrace access: run as the same user with kernel.yama.ptrace_scope=0, or as root)", pid, err)
	}
	defer mem.Close()

	comm, _ := os.ReadFile(proc + "/comm")
	md := &opts.Metadata
	if md.Source == "" {
		md.Source = fmt.Sprintf("pid %d (%s)", pid, strings.TrimSpace(string(comm)))
	}
	if md.Extra == nil {
		md.Extra = map[string]string{}
	}
	md.Extra["pid"] = strconv.Itoa(pid)
	md.Extra["comm"] = strings.TrimSpace(string(comm))
	if exe, err := os.Readlink(proc + "/exe"); err == nil {
		md.Extra["exe"] = exe
	}

	fw, err := format.NewWriter(w, opts.WriterOptions)
	if err != nil {
		return format.WriterStats{}, err
	}
	defer func() {
		if err != nil {
			fw.Abort() // no index: a failed snapshot must not look valid
		}
	}()
	var total, done uint64
	for _, m := range sel {
		total += m.End - m.Start
	}
	pr := &pidReader{ctx: ctx, mem: mem, fw: fw, opts: &opts, buf: make([]byte, copyBufSize), total: total, done: &done}
	for _, m := range sel {
		if err := pr.mapping(m); err != nil {
			return fw.Stats(), err
		}
	}
	if err := fw.Close(); err != nil {
		return fw.Stats(), err
	}
	return fw.Stats(), nil
}

type pidReader struct {
	ctx   context.Context
	mem   *os.File
	fw    *format.Writer
	opts  *Options
	buf   []byte
	total uint64
	done  *uint64
}

const pageSize = 4096

// mapping copies one mapping, splitting it around unreadable pages.
func (p *pidReader) mapping(m Mapping) error {
	open := false
	end := func() error {
		if open {
			open = false
			return p.fw.EndRegion()
		}
		return nil
	}
	addr := m.Start
	for addr < m.End {
		if err := p.ctx.Err(); err != nil {
			return err
		}
		want := min(uint64(len(p.buf)), m.End-addr)
		n, rerr := p.mem.ReadAt(p.buf[:want], int64(addr))
		if n > 0 {
			if !open {
				if err := p.fw.BeginRegion(m.Name(), addr, m.Prot()); err != nil {
					return err
				}
				open = true
			}
			if _, err := p.fw.Write(p.buf[:n]); err != nil {
				return err
			}
			addr += uint64(n)
			*p.done += uint64(n)
			p.opts.progress(*p.done, p.total)
		}
		if rerr == nil && n > 0 {
			continue
		}
		if rerr != nil && !errors.Is(rerr, unix.EIO) && !errors.Is(rerr, unix.EFAULT) && !errors.Is(rerr, io.EOF) {
			return fmt.Errorf("read %s at %#x: %w", m.Name(), addr, rerr)
		}
		if addr >= m.End {
			break
		}
		// Unreadable from addr: skip page by page until readable again.
		if err := end(); err != nil {
			return err
		}
		bad := addr
		for addr < m.End {
			if _, err := p.mem.ReadAt(p.buf[:1], int64(addr)); err == nil {
				break
			}
			addr = (addr + pageSize) &^ (pageSize - 1)
		}
		addr = min(addr, m.End)
		p.opts.warn("%s: %#x-%#x (%d KiB) unreadable, skipped", m.Name(), bad, addr, (addr-bad)>>10)
		*p.done += addr - bad
		p.opts.progress(*p.done, p.total)
	}
	return end()
}
