package attach

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/uffdrestore/uffdrestore/restore/internal/engine"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// ClientOptions say how a Go target maps the snapshot.
type ClientOptions struct {
	// Private maps with MAP_PRIVATE: writes stay in this process
	// (copy-on-write); without it writes go to the shared backing file and
	// every other shared target sees them.
	Private bool
	// AtOriginalAddr maps each region at its original address (MAP_FIXED_NOREPLACE).
	// With a hugetlb backing those addresses must be huge-page aligned.
	AtOriginalAddr bool
	// ReadOnly maps PROT_READ only.
	ReadOnly bool
	// Uffd chooses how the userfaultfd is opened (default: syscall, then
	// /dev/userfaultfd, then, as the C client does, UFFD_USER_MODE_ONLY,
	// which any user may open: see Client.UserModeOnly).
	Uffd uffd.OpenOptions
	// Timeout bounds each step of the handshake (default 10 s).
	Timeout time.Duration
	// ServerUID is one more uid the server may run as. Dial checks the
	// server's uid (SO_PEERCRED) before it maps anything or sends its
	// userfaultfd: by default it must be root or this process's effective
	// uid; anyone else could have bound the path and would serve its own
	// bytes (and receive the userfaultfd). 0 adds nothing (root is always
	// accepted).
	ServerUID uint32
	// ReattachTimeout: when the server dies (the socket closes), Poll
	// connects to the same path again and re-attaches this client to a
	// restarted server (`uffdrestore load --adopt`, PROTOCOL.md §5.1),
	// retrying with a back-off (10 ms doubling to 500 ms) for this long.
	// 0 means 30 s; < 0 turns it off (Poll then reports the closed
	// session at once). The client keeps the backing fd open for it.
	ReattachTimeout time.Duration
}

// ErrOtherSnapshot: re-attaching, the server now on the path serves another
// snapshot or layout (or does not take a reattach). A fault on a page never
// filled would wait forever: report it and exit.
var ErrOtherSnapshot = errors.New("attach: the restarted server serves another snapshot")

// CheckServer checks who listens on the other end of c: root, this
// process's effective uid, or extra. A client calls it before it trusts
// anything the server sends.
func CheckServer(c *net.UnixConn, path string, extra uint32) error {
	cred, err := peerCred(c)
	if err != nil {
		return fmt.Errorf("attach: %s: who is the server: %w", path, err)
	}
	me := uint32(os.Geteuid())
	if cred.Uid == 0 || cred.Uid == me || cred.Uid == extra {
		return nil
	}
	return fmt.Errorf("%w: the server on %s runs as uid %d (pid %d), not root or this process's uid %d: refusing to map its memory or send it a userfaultfd (if uid %d is trusted, allow it: ClientOptions.ServerUID, uffdrestore-target --server-uid %d)",
		ErrUntrustedServer, path, cred.Uid, cred.Pid, me, cred.Uid, cred.Uid)
}

// ClientRegion is one mapped region.
type ClientRegion struct {
	Region
	// Data is the mapping: Length bytes of the region (the mapping itself is
	// Size bytes). Valid until Detach or Close.
	Data []byte
	m    *uffd.Mapping
}

// Client is a Go target attached to a server.
//
// Touching Data faults into the server, another process, so a goroutine
// that faults blocks its thread (and its P) only until the server answers:
// the in-process trap (package restore's documentation) does not apply. If the server dies,
// touching a page it never filled waits forever: this process keeps its
// own copy of the userfaultfd, so it never reads unfilled zeros.
type Client struct {
	Hello   Hello
	Regions []ClientRegion

	c        *net.UnixConn
	u        *uffd.FD
	timeout  time.Duration
	mu       sync.Mutex
	closed   bool
	shutdown bool // the server sent shutdown

	// Re-attaching (PROTOCOL.md §5.1).
	path    string
	o       ClientOptions
	backing int // kept for a reattach; -1 when re-attaching is off
	attach  Attach
	// Reattaches counts the re-attaches Poll made.
	Reattaches int
}

// UserModeOnly reports whether the client's userfaultfd is
// UFFD_USER_MODE_ONLY (this user may open no other): a system call that
// reads or writes an unfilled page of a region (read(2) into it, write(2)
// from it) fails with EFAULT instead of waiting. Touch such pages first.
func (cl *Client) UserModeOnly() bool { return cl.u.Via() == uffd.ViaUserModeOnly }

// ForkEvents reports whether UFFD_FEATURE_EVENT_FORK is on (it needs
// CAP_SYS_PTRACE). Without it the regions are MADV_DONTFORK: a child
// forked without exec has no mapping of them (the kernel would leave it an
// unserved copy, reading zeros where nothing was filled yet).
func (cl *Client) ForkEvents() bool { return cl.u.Features()&uffd.FeatureEventFork != 0 }

// WantFeatures is what a client asks UFFDIO_API for: minor and missing
// faults for the backing, and the non-cooperative events (remap, remove,
// unmap, fork) where the kernel has them. The minor feature is required.
func WantFeatures(backing string) (want, required uffd.Features, err error) {
	switch backing {
	case BackingHugetlb:
		required = uffd.FeatureMinorHugetlbfs
		want = required | uffd.FeatureMissingHugetlbfs
	case BackingShmem:
		required = uffd.FeatureMinorShmem
		want = required | uffd.FeatureMissingShmem
	default:
		return 0, 0, fmt.Errorf("attach: unknown backing %q", backing)
	}
	want |= uffd.FeatureEventRemap | uffd.FeatureEventRemove | uffd.FeatureEventUnmap | uffd.FeatureEventFork
	return want, required, nil
}

// Dial connects to the server at path, maps the snapshot, registers it with
// a new userfaultfd and attaches. On success every region is readable.
func Dial(path string, o ClientOptions) (_ *Client, err error) {
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("attach: connect to %s: %w", path, err)
	}
	if o.ReattachTimeout == 0 {
		o.ReattachTimeout = 30 * time.Second
	}
	cl := &Client{c: c, timeout: o.Timeout, path: path, o: o, backing: -1}
	defer func() {
		if err != nil {
			cl.release()
		}
	}()
	if err := CheckServer(c, path, o.ServerUID); err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(o.Timeout))
	hello, fds, err := RecvHello(func() ([]byte, []int, error) { return RecvMsg(c) })
	defer CloseFDs(fds) // the backing fd: the mappings keep the file
	// A hello this client refuses is answered with an error naming why
	// (PROTOCOL.md §3.4), so the server's log says what to fix.
	rejectHello := func(err error) error {
		if !errors.Is(err, ErrRefused) {
			c.SetWriteDeadline(time.Now().Add(o.Timeout))
			SendMsg(c, Reply{Type: TypeError, Error: "client refuses the hello: " + err.Error()})
		}
		return err
	}
	if err != nil {
		return nil, rejectHello(err)
	}
	cl.Hello = hello
	h := &cl.Hello
	if h.Adopting && len(fds) == 0 {
		return nil, rejectHello(fmt.Errorf("%w: the server is adopting the targets of a server that died (load --adopt): it serves only re-attaching targets until one hands back the backing; attach again later", ErrRefused))
	}
	if len(fds) != 1 {
		return nil, rejectHello(invalid(TypeHello, "fds", "%d file descriptors came with the hello, want 1", len(fds)))
	}
	// A server with read-only targets sends an O_RDONLY fd: only a
	// MAP_PRIVATE mapping of it can be registered (the kernel refuses
	// UFFDIO_REGISTER on a shared mapping the process may not write).
	if fl, err := unix.FcntlInt(uintptr(fds[0]), unix.F_GETFL, 0); err == nil && fl&unix.O_ACCMODE == unix.O_RDONLY && !o.Private {
		return nil, rejectHello(fmt.Errorf("attach: the server gives read-only access to the snapshot (load --read-only-targets): map it private (ClientOptions.Private)"))
	}
	want, required, err := WantFeatures(h.Backing)
	if err != nil {
		return nil, err
	}
	uo := o.Uffd
	if uo.Via == uffd.ViaAuto {
		uo.FallbackUserModeOnly = true
	}
	have, _, err := uffd.Supported(uo)
	if err != nil {
		return nil, fmt.Errorf("attach: userfaultfd: %w", err)
	}
	if have&required != required {
		_, err := uffd.Open(uo, required) // for its NotSupportedError
		return nil, fmt.Errorf("attach: %w", err)
	}
	cl.u, err = uffd.Open(uo, want&have)
	if errors.Is(err, unix.EPERM) && want&have&uffd.FeatureEventFork != 0 {
		// Fork events need CAP_SYS_PTRACE; a Go process forks only to
		// exec, so go on without them (on a new userfaultfd: Open makes one).
		cl.u, err = uffd.Open(uo, want&have&^uffd.FeatureEventFork)
	}
	if err != nil {
		return nil, fmt.Errorf("attach: userfaultfd: %w", err)
	}
	prot := unix.PROT_READ | unix.PROT_WRITE
	if o.ReadOnly {
		prot = unix.PROT_READ
	}
	flags := unix.MAP_SHARED
	if o.Private {
		flags = unix.MAP_PRIVATE
	}
	// The features enabled: what was asked for (some kernels report back
	// every supported feature, not the enabled ones).
	a := Attach{Type: TypeAttach, Version: Version, UffdFeatures: uint64(want & have)}
	for i, r := range h.Regions {
		if r.Size == 0 { // an empty region: nothing to map
			cl.Regions = append(cl.Regions, ClientRegion{Region: r, Data: []byte{}})
			continue
		}
		var hint uintptr
		fl := flags
		if o.AtOriginalAddr {
			if r.Addr == 0 || r.Addr%h.PageSize != 0 {
				return nil, fmt.Errorf("attach: region %d %q: original address %#x is not a multiple of the page size %d (a hugetlb backing needs huge-page-aligned addresses)", i, r.Name, r.Addr, h.PageSize)
			}
			hint, fl = uintptr(r.Addr), fl|unix.MAP_FIXED_NOREPLACE
		}
		m, err := uffd.Mmap(hint, int(r.Size), prot, fl, fds[0], int64(r.Offset))
		if err != nil {
			return nil, fmt.Errorf("attach: map region %d %q: %w%s", i, r.Name, err, mapCountHint(err, len(h.Regions)))
		}
		cl.Regions = append(cl.Regions, ClientRegion{Region: r, Data: m.Bytes()[:r.Length], m: m})
		if _, err := cl.u.Register(m.Addr(), uintptr(r.Size), uffd.ModeMissing|uffd.ModeMinor); err != nil {
			return nil, fmt.Errorf("attach: register region %d %q: %w", i, r.Name, err)
		}
		a.Mappings = append(a.Mappings, Mapping{Region: i, BaseHostVirtAddr: uint64(m.Addr()),
			Size: r.Size, Offset: r.Offset, PageSize: h.PageSize, Private: o.Private})
	}
	if !cl.ForkEvents() {
		// As the C client does: a child forked without exec would get
		// an unserved copy (zeros where nothing was filled yet); leave it
		// none, so a touch there is SIGSEGV rather than wrong bytes.
		for i, r := range cl.Regions {
			if r.m != nil {
				if err := r.m.Madvise(0, r.m.Len(), unix.MADV_DONTFORK); err != nil {
					return nil, fmt.Errorf("attach: region %d %q: madvise(MADV_DONTFORK) without fork events: %w", i, r.Name, err)
				}
			}
		}
	}
	if err := SendAttach(func(v any, fds ...int) error { return SendMsg(c, v, fds...) }, a, cl.u.Fd()); err != nil {
		return nil, err
	}
	cl.attach = a
	if h.Reattach && o.ReattachTimeout > 0 {
		// Kept to hand back to a restarted server (PROTOCOL.md §5.1).
		if cl.backing, err = unix.FcntlInt(uintptr(fds[0]), unix.F_DUPFD_CLOEXEC, 0); err != nil {
			cl.backing = -1
			return nil, fmt.Errorf("attach: keep the backing fd: %w", err)
		}
	}
	raw, fds2, err := RecvMsg(c)
	CloseFDs(fds2)
	if err != nil {
		return nil, err
	}
	var r Reply
	if err := Decode(raw, TypeReady, &r); err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Time{})
	return cl, nil
}

// Region returns the region named name when exactly one region has that
// name. Names need not be unique (a process snapshot has many "anon"
// regions): for a name several regions share it fails with an error
// listing their indexes; use Find and Regions[i] then.
func (cl *Client) Region(name string) (*ClientRegion, error) {
	i, err := engine.Layout{Regions: cl.Hello.Regions}.Lookup(name)
	if err != nil {
		return nil, err
	}
	return &cl.Regions[i], nil
}

// Find returns the indexes (into Regions) of every region named name.
func (cl *Client) Find(name string) []int { return cl.Hello.Find(name) }

// mapCountHint explains an mmap ENOMEM when the snapshot has many regions:
// the process may have reached vm.max_map_count.
func mapCountHint(err error, regions int) string {
	if !errors.Is(err, unix.ENOMEM) || regions < 1000 {
		return ""
	}
	limit := "vm.max_map_count"
	if b, e := os.ReadFile(maxMapCountPath); e == nil {
		limit += "=" + strings.TrimSpace(string(b))
	}
	return fmt.Sprintf(" (this target maps %d regions, one mapping each, besides its own: it may have reached %s mappings; raise it with sysctl -w vm.max_map_count=N)", regions, limit)
}

// request sends a message and waits for a reply of type want, skipping
// shutdown notices.
func (cl *Client) request(typ, want string) (*Reply, error) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.closed {
		return nil, os.ErrClosed
	}
	if err := SendMsg(cl.c, Reply{Type: typ}); err != nil {
		return nil, err
	}
	cl.c.SetReadDeadline(time.Now().Add(cl.timeout))
	defer cl.c.SetReadDeadline(time.Time{})
	for {
		raw, fds, err := RecvMsg(cl.c)
		CloseFDs(fds)
		if err != nil {
			return nil, err
		}
		var r Reply
		if t, err := PeekType(raw); err == nil && t == TypeShutdown {
			cl.shutdown = true
			continue
		}
		if err := Decode(raw, want, &r); err != nil {
			return nil, err
		}
		return &r, nil
	}
}

// Poll reads the server's notices, waiting up to wait for the first one
// (0: only what is pending). It reports whether the server asked this target
// to detach (it is shutting down). Its error is why the session ended: the
// server's error message (errors.Is ErrRefused; after ready that is a fault
// the server could not answer, or a target that broke the protocol) or
// ErrClosed (the server is gone). A thread waiting in a fault of an ended
// session stays blocked, never reading wrong bytes: report the error and
// exit.
func (cl *Client) Poll(wait time.Duration) (shutdown bool, err error) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.closed {
		return false, os.ErrClosed
	}
	defer cl.c.SetReadDeadline(time.Time{})
	for deadline := time.Now().Add(wait); ; deadline = time.Now() {
		cl.c.SetReadDeadline(deadline)
		raw, fds, err := RecvMsg(cl.c)
		CloseFDs(fds)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return cl.shutdown, nil
		}
		if errors.Is(err, ErrClosed) && cl.backing >= 0 {
			// The server is gone: a restarted one may take us back.
			if err = cl.reattach(); err == nil {
				continue
			}
		}
		if err != nil {
			return cl.shutdown, fmt.Errorf("attach: session ended: %w", err)
		}
		typ, err := PeekType(raw)
		if err != nil {
			return cl.shutdown, err
		}
		switch typ {
		case TypeShutdown:
			cl.shutdown = true
		case TypeError:
			return cl.shutdown, fmt.Errorf("attach: the server ended the session: %w", Decode(raw, TypeShutdown, nil))
		default:
			return cl.shutdown, invalid(typ, "type", "a %q message arrived unasked", typ)
		}
	}
}

// Stats asks the server for this target's stats (JSON).
func (cl *Client) Stats() (json.RawMessage, error) {
	r, err := cl.request(TypeStats, TypeStats)
	if err != nil {
		return nil, err
	}
	return r.Stats, nil
}

// Detach tells the server to stop serving, waits for its goodbye, then
// unregisters, unmaps and closes everything. No goroutine may touch the
// regions any more. It returns the final stats.
func (cl *Client) Detach() (json.RawMessage, error) {
	r, err := cl.request(TypeDetach, TypeBye)
	cl.release()
	if err != nil {
		return nil, fmt.Errorf("attach: detach: %w", err)
	}
	return r.Stats, nil
}

// Close hangs up without a goodbye and unmaps everything; the server sees
// the socket close and frees this target's state.
func (cl *Client) Close() error {
	cl.mu.Lock()
	closed := cl.closed
	cl.mu.Unlock()
	if closed {
		return os.ErrClosed
	}
	cl.release()
	return nil
}

// release unregisters (so the munmaps raise no events the server must
// read), closes the uffd, unmaps, closes the socket.
func (cl *Client) release() {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.closed {
		return
	}
	cl.closed = true
	var errs []error
	for _, r := range cl.Regions {
		if cl.u != nil && r.m != nil {
			if err := cl.u.Unregister(r.m.Addr(), uintptr(r.m.Len())); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if cl.u != nil {
		cl.u.Close()
	}
	for _, r := range cl.Regions {
		if r.m != nil {
			r.m.Close()
		}
	}
	cl.Regions = nil
	if cl.c != nil {
		cl.c.Close()
	}
	if cl.backing >= 0 {
		unix.Close(cl.backing)
		cl.backing = -1
	}
	_ = errors.Join(errs...)
}

// reattach connects to the same path again until a server takes this
// client back or ReattachTimeout passed (PROTOCOL.md §5.1). Called with
// cl.mu held.
func (cl *Client) reattach() error {
	first := fmt.Errorf("attach: the server on %s closed the session", cl.path)
	deadline := time.Now().Add(cl.o.ReattachTimeout)
	delay := 10 * time.Millisecond
	for attempt := 1; ; attempt++ {
		c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: cl.path, Net: "unixpacket"})
		if err == nil {
			if err = cl.reattachOnce(c); err == nil {
				cl.c.Close()
				cl.c = c
				cl.shutdown = false
				cl.Reattaches++
				return nil
			}
			c.Close()
			if errors.Is(err, ErrOtherSnapshot) || errors.Is(err, ErrUntrustedServer) || errors.Is(err, ErrRefused) {
				return fmt.Errorf("%v; re-attaching: %w", first, err)
			}
		}
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("%w; no server re-attached this client within %v (%d attempts; last: %v)", first, cl.o.ReattachTimeout, attempt, err)
		}
		time.Sleep(min(delay, left))
		delay = min(2*delay, 500*time.Millisecond)
	}
}

// reattachOnce runs one reattach handshake on c.
func (cl *Client) reattachOnce(c *net.UnixConn) error {
	if err := CheckServer(c, cl.path, cl.o.ServerUID); err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(cl.timeout))
	defer c.SetReadDeadline(time.Time{})
	h, fds, err := RecvHello(func() ([]byte, []int, error) { return RecvMsg(c) })
	CloseFDs(fds) // a server's own backing: ours is mapped already
	if err != nil {
		return err
	}
	old := &cl.Hello
	switch {
	case !h.Reattach:
		return fmt.Errorf("%w: the server now on %s does not take re-attaching targets (an older uffdrestore load)", ErrOtherSnapshot, cl.path)
	case h.SnapshotID != old.SnapshotID:
		return fmt.Errorf("%w: the server now on %s serves %q (id %s), this client maps id %s: restart `uffdrestore load` with the snapshot this client was restored from", ErrOtherSnapshot, cl.path, h.Snapshot, h.SnapshotID, old.SnapshotID)
	case h.Backing != old.Backing || h.PageSize != old.PageSize || h.FileSize != old.FileSize || len(h.Regions) != len(old.Regions):
		return fmt.Errorf("%w: the server now on %s lays the snapshot out differently (backing %s, pages of %d bytes, %d bytes; this client maps %s, %d, %d): restart it with the first server's --backing", ErrOtherSnapshot, cl.path, h.Backing, h.PageSize, h.FileSize, old.Backing, old.PageSize, old.FileSize)
	}
	for i, r := range h.Regions {
		if o := old.Regions[i]; r.Offset != o.Offset || r.Size != o.Size || r.Length != o.Length {
			return fmt.Errorf("%w: region %d of the server now on %s is not the one this client maps", ErrOtherSnapshot, i, cl.path)
		}
	}
	a := cl.attach
	a.Type = TypeReattach
	c.SetWriteDeadline(time.Now().Add(cl.timeout))
	defer c.SetWriteDeadline(time.Time{})
	if err := SendAttach(func(v any, fds ...int) error { return SendMsg(c, v, fds...) }, a, cl.u.Fd(), cl.backing); err != nil {
		return err
	}
	raw, fds2, err := RecvMsg(c)
	CloseFDs(fds2)
	if err != nil {
		return err
	}
	return Decode(raw, TypeReady, &Reply{})
}
