package engine

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// WithFillJournal keeps a record of the units being filled in the file at
// path (4 bytes per unit, MAP_SHARED, so it outlives this process): a unit
// is marked when a filler claims it and unmarked once every byte of it is
// written. A server that died leaves marked the units it was in the middle
// of; AdoptLoader with the same journal punches those out of the backing
// before it learns which units are present, so a half-written unit is
// filled again instead of served (PROTOCOL.md §5.1). `uffdrestore load`
// keeps it beside its socket (SOCKET.fills) and removes it when it stops.
func WithFillJournal(path string) Option { return func(c *config) { c.journal = path } }

// Journal words.
const (
	jIdle   uint32 = iota
	jFill          // a fill of an absent unit: no target has seen any of it
	jRefill        // a refill of the pages a target punched: its other pages may hold a shared target's writes
)

type fillJournal struct {
	m *uffd.Mapping
	w []uint32
}

// openJournal opens (creating it, never following a symlink) the journal
// for n units. keep keeps what it holds (AdoptLoader reads it); otherwise
// it is cleared.
func openJournal(path string, n int, keep bool) (*fillJournal, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("restore: fill journal %s: %w", path, err)
	}
	defer unix.Close(fd)
	return mapJournal(fd, path, n, keep)
}

// newJournalFile makes a fill journal with no name (a memfd): what a lazy
// Open keeps for its helpers (each one it starts maps it, so a new one
// learns what the one that died was filling), at no cost of a directory
// and a file on disk on the way to the first byte.
func newJournalFile() (*os.File, error) {
	fd, err := unix.MemfdCreate("uffdrestore-fill-journal", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("restore: fill journal: %w", os.NewSyscallError("memfd_create", err))
	}
	return os.NewFile(uintptr(fd), "uffdrestore-fill-journal"), nil
}

// mapJournal maps the journal open at fd (named path in errors) for n
// units; keep as in openJournal.
func mapJournal(fd int, path string, n int, keep bool) (*fillJournal, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("restore: fill journal %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || (st.Uid != uint32(os.Geteuid()) && st.Uid != 0) {
		return nil, fmt.Errorf("restore: fill journal %s is not a regular file of this uid (mode %#o, uid %d): remove it", path, st.Mode, st.Uid)
	}
	size := int64(max(n, 1)) * 4
	if !keep || st.Size != size {
		if err := unix.Ftruncate(fd, 0); err != nil {
			return nil, fmt.Errorf("restore: fill journal %s: %w", path, err)
		}
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		return nil, fmt.Errorf("restore: fill journal %s: %w", path, err)
	}
	m, err := uffd.Mmap(0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, fd, 0)
	if err != nil {
		return nil, fmt.Errorf("restore: fill journal %s: %w", path, err)
	}
	return &fillJournal{m: m, w: unsafe.Slice((*uint32)(unsafe.Pointer(&m.Bytes()[0])), n)}, nil
}

func (j *fillJournal) close() {
	if j != nil {
		j.m.Close()
	}
}

// journalMark records that unit u is being filled (before any byte of it is written).
func (e *engine) journalMark(u uint32) {
	if j := e.journal; j != nil {
		v := jFill
		if e.partial[u].Load() {
			v = jRefill
		}
		atomic.StoreUint32(&j.w[u], v)
	}
}

// journalDone records that unit u is written in full (or punched out).
func (e *engine) journalDone(u uint32) {
	if j := e.journal; j != nil {
		atomic.StoreUint32(&j.w[u], jIdle)
	}
}

// journalRecover punches out of the backing every unit a dead server was
// filling from scratch (no target saw any of it, and it may be half
// written). A refill in flight is left alone: its present pages may hold a
// shared target's writes and the journal does not say which page was being
// written (PROTOCOL.md §5.1). It returns how many units it punched and
// left, and clears the journal.
func (e *engine) journalRecover() (punched, refills int, err error) {
	j := e.journal
	if j == nil {
		return 0, 0, nil
	}
	for u := range j.w {
		switch atomic.LoadUint32(&j.w[u]) {
		case jFill:
			if err := uffd.Fallocate(e.b.fd.Fd(), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(u)*int64(e.unitSize), int64(e.unitSize)); err != nil {
				return punched, refills, fmt.Errorf("restore: adopt: punch unit %d, which the dead server was filling: %w", u, err)
			}
			punched++
		case jRefill:
			refills++
		}
		atomic.StoreUint32(&j.w[u], jIdle)
	}
	return punched, refills, nil
}
