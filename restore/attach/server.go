package attach

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore/internal/engine"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// Range is one mapping of the backing file in a target, as the server hands
// it to the Backend: a view range of the engine (one type, no conversion).
type Range = engine.ViewRange

// Backend is what the server serves: a loaded snapshot in a backing file
// (restore.Loader, through FromLoader).
type Backend interface {
	// Hello returns the layout the hello carries (Type and Version are
	// filled in by the server).
	Hello() Hello
	// BackingFile is the backing file (nil: none yet); the Backend owns
	// it: the server sends its Fd, never closes it.
	BackingFile() *uffd.File
	// AttachView starts serving faults on u for ranges. It takes ownership
	// of u, also when it fails.
	AttachView(u *uffd.FD, ranges []Range, name string) (View, error)
}

// Waiter is a Backend that answers the optional "wait" request (PROTOCOL.md
// §3.8): Wait fills every unit and returns the fill error, if any. A server
// answers it only for a Backend that implements it and lists TypeWait in
// its Hello's Requests.
type Waiter interface {
	Wait(ctx context.Context) error
}

// Profiler is a Backend that answers the optional "profile" request: the
// working-set profile recorded so far.
type Profiler interface {
	Profile() (format.Profile, error)
}

// View is one target's attached view, served by the Backend.
type View interface {
	Done() <-chan struct{}
	Err() error
	Stats() engine.Stats
	Close() error
}

// Options configure a Server.
type Options struct {
	// Mode is the socket file's permission bits (default 0600).
	Mode fs.FileMode
	// AllowUIDs may attach in addition to the server's own uid and root.
	AllowUIDs []uint32
	// ReadOnlyTargets sends every target an O_RDONLY fd of the backing
	// (instead of O_RDWR), and takes group and other permissions off the
	// backing file so a target of another uid cannot reopen it for
	// writing through /proc/PID/fd. Such a target maps it MAP_PRIVATE
	// (copy-on-write): the kernel refuses UFFDIO_REGISTER on a shared
	// mapping of a file the process may not write.
	ReadOnlyTargets bool
	// HandshakeTimeout bounds hello → attach (default 10 s).
	HandshakeTimeout time.Duration
	// Logf receives one line per connection event (default: discard).
	Logf func(format string, args ...any)
	// OnDetach is called (from the connection's goroutine) when an attached
	// target is gone: detached, hung up, or detached by Shutdown.
	OnDetach func(TargetInfo)
	// OnRefuse is called (from the connection's goroutine) when a target of
	// an allowed uid fails before attaching; Reason is "refused: ...".
	// Connections of other uids are refused without it.
	OnRefuse func(TargetInfo)
}

// TargetInfo describes an attached target.
type TargetInfo struct {
	Name     string
	PID      int32
	UID      uint32
	Mappings int
	Reason   string       // why it ended: "detach", "hangup", "shutdown", "error: ..."
	Stats    engine.Stats // the view's last stats
}

// Server accepts targets on a Unix socket and serves each on its own
// goroutine; one target's failure never disturbs another.
type Server struct {
	path    string
	dev     uint64 // the socket file we bound (removeSocket removes only it)
	ino     uint64
	rofd    *uffd.File // ReadOnlyTargets: an O_RDONLY fd of the backing, else nil
	ln      *net.UnixListener
	b       Backend
	o       Options
	allowed []uint32

	mu       sync.Mutex
	conns    map[*conn]struct{}
	wg       sync.WaitGroup
	seq      atomic.Uint64
	stopping chan struct{} // closed by Shutdown: stop accepting, ask targets to detach
	force    chan struct{} // closed when Shutdown's context expires
	stopOnce sync.Once
	acceptWG sync.WaitGroup
}

// Listen creates the socket at path (refusing a symlink, replacing a stale
// socket file, refusing a live one) and starts serving b in the background.
func Listen(path string, b Backend, o Options) (*Server, error) {
	if o.Mode == 0 {
		o.Mode = 0o600
	}
	if o.HandshakeTimeout == 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	if err := CheckLayout(b.Hello()); err != nil {
		return nil, err
	}
	h := b.Hello()
	h.Version, h.RegionCount = Version, len(h.Regions)
	if err := h.Validate(); err != nil {
		hint := ""
		if h.Backing == BackingHugetlb {
			hint = " (regions must start on huge-page boundaries: load the snapshot into shmem (--backing shmem, or restore.ForTargets with auto), or re-create it with --chunk-size 2M)"
		}
		return nil, fmt.Errorf("attach: no target could attach to this layout: %w%s", err, hint)
	}
	if err := prepareSocketPath(path); err != nil {
		return nil, err
	}
	ln, dev, ino, err := bindPrivate(path, o.Mode)
	if err != nil {
		return nil, err
	}
	var rofd *uffd.File
	if o.ReadOnlyTargets && b.BackingFile().Fd() < 0 {
		ln.Close()
		removeIfSame(path, dev, ino)
		return nil, errors.New("attach: read-only targets need a backing at start; an adopting server has none until a target hands it back (use --read-only-targets without --adopt)")
	}
	if o.ReadOnlyTargets {
		if rofd, err = readOnlyBacking(b.BackingFile().Fd()); err != nil {
			ln.Close()
			removeIfSame(path, dev, ino)
			return nil, err
		}
	}
	s := &Server{
		path: path, dev: dev, ino: ino, ln: ln, b: b, o: o, rofd: rofd,
		allowed:  append([]uint32{uint32(os.Getuid()), 0}, o.AllowUIDs...),
		conns:    map[*conn]struct{}{},
		stopping: make(chan struct{}),
		force:    make(chan struct{}),
	}
	s.acceptWG.Add(1)
	go s.accept()
	return s, nil
}

// ServeConn serves one target already connected on c (one end of a
// socketpair: restore/helper serves its parent so) until its session ends,
// and returns the target's info, Reason saying why it ended. There is no
// listener and no socket file; everything else (the uid check, the
// handshake, the validation) is as for a target of Listen. ServeConn
// takes ownership of c.
func ServeConn(c *net.UnixConn, b Backend, o Options) TargetInfo {
	if o.HandshakeTimeout == 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	s := &Server{
		b: b, o: o,
		allowed:  append([]uint32{uint32(os.Getuid()), 0}, o.AllowUIDs...),
		conns:    map[*conn]struct{}{},
		stopping: make(chan struct{}),
		force:    make(chan struct{}),
	}
	cn := &conn{s: s, c: c, done: make(chan struct{})}
	h := b.Hello()
	h.Version, h.RegionCount = Version, len(h.Regions)
	if err := h.Validate(); err != nil {
		cn.refuse(fmt.Errorf("no target could attach to this layout: %w", err))
		c.Close()
		return TargetInfo{Reason: "error: " + err.Error()}
	}
	s.conns[cn] = struct{}{}
	s.wg.Add(1)
	cn.serve()
	return cn.info
}

// readOnlyBacking reopens the backing file read-only (through
// /proc/self/fd, so it is the same open file description's inode) and
// takes group and other permissions off it: any process holding an fd of a
// memfd (mode 0777) could otherwise reopen it O_RDWR through /proc.
func readOnlyBacking(fd int) (*uffd.File, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("attach: read-only backing: %w", os.NewSyscallError("fstat", err))
	}
	if st.Mode&0o077 != 0 {
		if err := unix.Fchmod(fd, st.Mode&0o700); err != nil {
			return nil, fmt.Errorf("attach: read-only backing: %w", os.NewSyscallError("fchmod", err))
		}
	}
	ro, err := uffd.Reopen(fd, unix.O_RDONLY)
	if err != nil {
		return nil, fmt.Errorf("attach: read-only backing: %w", err)
	}
	return ro, nil
}

// PrepareSocket checks that a server can listen on path (as Listen does:
// its directory exists, it is not a symlink or another kind of file, no
// live server is on it) and removes a stale socket file there. `load` calls
// it before it touches anything kept beside the socket.
func PrepareSocket(path string) error { return prepareSocketPath(path) }

// prepareSocketPath checks path can be bound: its directory exists, it is
// not a symlink or another kind of file, and a socket there is stale.
func prepareSocketPath(path string) error {
	if path == "" {
		return errors.New("attach: empty socket path")
	}
	// sun_path is 108 bytes including the NUL.
	if len(path) > 107 {
		return fmt.Errorf("attach: socket path %s is %d bytes long; a Unix socket path is at most 107", path, len(path))
	}
	dir := filepath.Dir(path)
	if st, err := os.Stat(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("attach: socket directory %s does not exist (create it first)", dir)
		}
		return fmt.Errorf("attach: socket directory: %w", err)
	} else if !st.IsDir() {
		return fmt.Errorf("attach: %s is not a directory", dir)
	}
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("attach: socket path: %w", err)
	}
	switch {
	case st.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("attach: socket path %s is a symlink; refusing to follow it (remove it or choose another path)", path)
	case st.Mode()&fs.ModeSocket == 0:
		return fmt.Errorf("attach: socket path %s exists and is not a socket (%s); refusing to replace it", path, st.Mode().Type())
	}
	// A socket file: live or stale?
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("attach: probe %s: %w", path, os.NewSyscallError("socket", err))
	}
	err = unix.Connect(fd, &unix.SockaddrUnix{Name: path})
	unix.Close(fd)
	switch {
	case err == nil, errors.Is(err, unix.EAGAIN):
		return fmt.Errorf("%w: socket %s is in use by a running server", ErrInUse, path)
	case errors.Is(err, unix.ECONNREFUSED):
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("attach: remove stale socket %s: %w", path, err)
		}
		return nil
	case errors.Is(err, unix.EPROTOTYPE):
		return fmt.Errorf("%w: socket %s is in use by something that is not an uffdrestore server (not SOCK_SEQPACKET)", ErrInUse, path)
	}
	return fmt.Errorf("attach: probe existing socket %s: %w", path, os.NewSyscallError("connect", err))
}

// Path is the socket path.
func (s *Server) Path() string { return s.path }

// Targets lists the targets attached now.
func (s *Server) Targets() []TargetInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []TargetInfo
	for c := range s.conns {
		if c.view.Load() != nil {
			out = append(out, c.info)
		}
	}
	slices.SortFunc(out, func(a, b TargetInfo) int { return strings.Compare(a.Name, b.Name) })
	return out
}

func (s *Server) accept() {
	defer s.acceptWG.Done()
	var delay time.Duration
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			select {
			case <-s.stopping:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: back off, keep serving the attached.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.o.Logf("accept: %v (retrying in %v)", err, delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		cn := &conn{s: s, c: c, done: make(chan struct{})}
		s.mu.Lock()
		select {
		case <-s.stopping:
			s.mu.Unlock()
			c.Close()
			return
		default:
		}
		s.conns[cn] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go cn.serve()
	}
}

// Shutdown stops accepting, sends {"type":"shutdown"} to every attached
// target, waits until they detached or ctx expires, then detaches the rest
// and removes the socket file. A target detached that way keeps its
// userfaultfd: touching a page that was never filled then waits forever.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopOnce.Do(func() {
		s.mu.Lock()
		close(s.stopping)
		s.mu.Unlock()
		s.ln.Close()
	})
	s.acceptWG.Wait()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		n := len(s.Targets())
		s.mu.Lock()
		select {
		case <-s.force:
		default:
			close(s.force)
		}
		s.mu.Unlock()
		<-done
		if n > 0 {
			err = fmt.Errorf("attach: shutdown: %d target(s) had not detached; detached them: %w", n, ctx.Err())
		}
	}
	s.removeSocket()
	return err
}

// Close is Shutdown with no grace period.
func (s *Server) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := s.Shutdown(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// removeSocket removes the socket file if it is still the one we created,
// and closes the read-only backing fd.
func (s *Server) removeSocket() {
	removeIfSame(s.path, s.dev, s.ino)
	s.rofd.Close()
}

func removeIfSame(path string, dev, ino uint64) {
	var st unix.Stat_t
	if unix.Lstat(path, &st) == nil && st.Dev == dev && st.Ino == ino && st.Mode&unix.S_IFMT == unix.S_IFSOCK {
		os.Remove(path)
	}
}

// bindPrivate creates the listening socket without ever following path:
// it binds inside a new 0700 directory beside path (reached through its
// fd, so nobody can swap it), sets the mode there, moves the socket into
// place with a rename that never replaces anything (RENAME_NOREPLACE, or
// link where the filesystem lacks it), and checks that the file now at
// path is the socket it bound. A chmod by path after bind would follow a
// symlink planted there in the meantime (in a directory others may write).
func bindPrivate(path string, mode fs.FileMode) (_ *net.UnixListener, dev, ino uint64, err error) {
	dir, base := filepath.Dir(path), filepath.Base(path)
	fail := func(err error) (*net.UnixListener, uint64, uint64, error) {
		return nil, 0, 0, fmt.Errorf("attach: listen on %s: %w", path, err)
	}
	parent, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail(os.NewSyscallError("open "+dir, err))
	}
	defer unix.Close(parent)
	priv, err := os.MkdirTemp(dir, ".uffdrestore-bind-")
	if err != nil {
		return fail(err)
	}
	privName := filepath.Base(priv)
	pfd, err := unix.Openat(parent, privName, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		os.Remove(priv)
		return fail(os.NewSyscallError("open "+priv, err))
	}
	defer func() {
		unix.Unlinkat(pfd, "s", 0) // still there only on failure
		unix.Close(pfd)
		// By name: if someone renamed ours, rmdir of theirs fails or
		// removes an empty directory, never anything else.
		unix.Unlinkat(parent, privName, unix.AT_REMOVEDIR)
	}()
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil || st.Uid != uint32(os.Geteuid()) || st.Mode&0o077 != 0 {
		return fail(fmt.Errorf("private directory %s is not ours (mode %o, uid %d)", priv, st.Mode&0o7777, st.Uid))
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fail(os.NewSyscallError("socket", err))
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	// Through /proc/self/fd: the private directory by its fd, and a path
	// that fits sun_path whatever the length of dir.
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: fmt.Sprintf("/proc/self/fd/%d/s", pfd)}); err != nil {
		return fail(os.NewSyscallError("bind", err))
	}
	if err := unix.Fchmodat(pfd, "s", uint32(mode.Perm()), 0); err != nil {
		return fail(os.NewSyscallError("chmod", err))
	}
	if err := unix.Fstatat(pfd, "s", &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fail(fmt.Errorf("the socket just bound in %s is gone", priv))
	}
	dev, ino = st.Dev, st.Ino
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		return fail(os.NewSyscallError("listen", err))
	}
	err = unix.Renameat2(pfd, "s", parent, base, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		if err = unix.Linkat(pfd, "s", parent, base, 0); err == nil {
			unix.Unlinkat(pfd, "s", 0)
		}
	}
	if errors.Is(err, unix.EEXIST) {
		return fail(fmt.Errorf("something was created at the socket path while binding; refusing to replace it (make the socket's directory writable by its owner only)"))
	}
	if err != nil {
		return fail(os.NewSyscallError("rename into place", err))
	}
	// What is at path now must be the socket we bound.
	var at unix.Stat_t
	if err := unix.Fstatat(parent, base, &at, unix.AT_SYMLINK_NOFOLLOW); err != nil || at.Dev != dev || at.Ino != ino {
		removeIfSame(path, dev, ino)
		return fail(fmt.Errorf("the socket file was moved or replaced right after it was created (someone else can write %s: use a directory only the server's user can write)", dir))
	}
	l, err := net.FileListener(f)
	if err != nil {
		removeIfSame(path, dev, ino)
		return fail(err)
	}
	ln := l.(*net.UnixListener)
	ln.SetUnlinkOnClose(false)
	return ln, dev, ino, nil
}

// conn is one target connection.
type conn struct {
	s    *Server
	c    *net.UnixConn
	info TargetInfo
	view atomic.Pointer[View]
	done chan struct{}
}

type inMsg struct {
	raw []byte
	err error
}

// setInfo changes cn.info under the server's lock (Targets reads it). Only
// the connection's own goroutine writes it, so it may read it unlocked.
func (cn *conn) setInfo(f func(*TargetInfo)) {
	cn.s.mu.Lock()
	f(&cn.info)
	cn.s.mu.Unlock()
}

func (cn *conn) logf(format string, args ...any) {
	cn.s.o.Logf("%s: "+format, append([]any{cn.info.Name}, args...)...)
}

func (cn *conn) send(v any, fds ...int) error {
	cn.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	return SendMsg(cn.c, v, fds...)
}

func (cn *conn) refuse(err error) {
	cn.logf("refused: %v", err)
	cn.send(Reply{Type: TypeError, Error: err.Error(), Code: ErrorCode(err)})
	// Read what the peer sent already (the rest of an attach's batches):
	// closing a socket with unread messages resets the connection, and the
	// peer would see ECONNRESET instead of the error. Bounded in time.
	cn.c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	for {
		_, fds, err := RecvMsg(cn.c)
		CloseFDs(fds)
		if err != nil {
			break
		}
	}
}

func (cn *conn) serve() {
	s := cn.s
	defer func() {
		cn.c.Close()
		close(cn.done)
		s.mu.Lock()
		delete(s.conns, cn)
		s.mu.Unlock()
		s.wg.Done()
	}()
	name := "target#" + strconv.FormatUint(s.seq.Add(1), 10)
	cn.setInfo(func(ti *TargetInfo) { ti.Name = name })
	// A forced shutdown ends a handshake in progress by closing its socket;
	// an attached target is ended by attached() itself.
	go func() {
		select {
		case <-s.force:
			if cn.view.Load() == nil {
				cn.c.Close()
			}
		case <-cn.done:
		}
	}()
	v, err := cn.handshake()
	if err != nil {
		cn.refuse(err)
		if s.o.OnRefuse != nil && cn.info.PID != 0 && slices.Contains(s.allowed, cn.info.UID) {
			cn.setInfo(func(ti *TargetInfo) { ti.Reason = "refused: " + err.Error() })
			s.o.OnRefuse(cn.info)
		}
		return
	}
	reason := cn.attached(v)
	st := v.Stats()
	cn.setInfo(func(ti *TargetInfo) { ti.Stats, ti.Reason = st, reason })
	cn.logf("ended: %s", reason)
	if s.o.OnDetach != nil {
		s.o.OnDetach(cn.info)
	}
}

// handshake runs hello → attach and returns the attached view.
func (cn *conn) handshake() (View, error) {
	s := cn.s
	cred, err := peerCred(cn.c)
	if err != nil {
		return nil, err
	}
	cn.setInfo(func(ti *TargetInfo) {
		ti.PID, ti.UID = cred.Pid, cred.Uid
		ti.Name += " (pid " + strconv.Itoa(int(cred.Pid)) + ")"
	})
	if !slices.Contains(s.allowed, cred.Uid) {
		return nil, fmt.Errorf("uid %d may not attach (allowed: %s; see --allow-uid)", cred.Uid, uidList(s.allowed))
	}
	select {
	case <-s.stopping:
		return nil, errors.New("server is shutting down")
	default:
	}
	h := s.b.Hello()
	h.Type, h.Version, h.RegionCount = TypeHello, Version, len(h.Regions)
	h.Reattach = true
	backingFD := s.b.BackingFile().Fd()
	h.Adopting = backingFD < 0
	if s.rofd != nil {
		backingFD = s.rofd.Fd()
	}
	if err := SendHello(cn.send, h, backingFD); err != nil {
		return nil, err
	}
	cn.c.SetReadDeadline(time.Now().Add(s.o.HandshakeTimeout))
	a, fds, err := RecvAttach(func() ([]byte, []int, error) { return RecvMsg(cn.c) })
	if err != nil {
		CloseFDs(fds)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if a.MappingCount > 0 {
				return nil, fmt.Errorf("no complete attach within %v (it announced %d mappings)", s.o.HandshakeTimeout, a.MappingCount)
			}
			return nil, fmt.Errorf("no attach message within %v", s.o.HandshakeTimeout)
		}
		return nil, err
	}
	cn.c.SetReadDeadline(time.Time{})
	reattach, backing := a.Type == TypeReattach, -1
	if reattach {
		if len(fds) != 2 {
			CloseFDs(fds)
			return nil, invalid(TypeReattach, "fds", "%d file descriptors came with the message, want exactly 2 (the userfaultfd, then the backing file)", len(fds))
		}
		// The backing is adopted or compared last, once the rest is valid.
		backing = fds[1]
		defer unix.Close(backing)
		fds = fds[:1]
	} else if h.Adopting {
		CloseFDs(fds)
		return nil, errors.New("this server is adopting the targets of a server that died (load --adopt): it serves only re-attaching targets until one hands back the backing; attach again later")
	}
	if len(fds) != 1 {
		CloseFDs(fds)
		return nil, invalid(TypeAttach, "fds", "%d file descriptors came with the message, want exactly 1 (the userfaultfd)", len(fds))
	}
	if !IsUserfaultfd(fds[0]) {
		CloseFDs(fds)
		return nil, invalid(TypeAttach, "fds", "the file descriptor is not a userfaultfd")
	}
	if err := a.Validate(&h); err != nil {
		CloseFDs(fds)
		return nil, err
	}
	// The features in effect, from the kernel: a userfaultfd that never
	// had UFFDIO_API has none, and one without minor faults for this
	// backing cannot be served. The attach's uffd_features is only what
	// the target says; the server uses what the kernel says.
	feat, err := enabledFeatures(fds[0], h.Backing)
	if err != nil {
		CloseFDs(fds)
		return nil, err
	}
	// A uffd must be non-blocking for a poll loop; the flag is shared with
	// the target's copy, which only uses it for ioctls.
	if err := unix.SetNonblock(fds[0], true); err != nil {
		CloseFDs(fds)
		return nil, fmt.Errorf("set userfaultfd non-blocking: %w", err)
	}
	if reattach {
		if err := cn.checkReattach(backing); err != nil {
			CloseFDs(fds)
			return nil, err
		}
	}
	ranges := make([]Range, len(a.Mappings))
	for i, m := range a.Mappings {
		ranges[i] = Range{Base: uintptr(m.BaseHostVirtAddr), Size: m.Size, Offset: m.Offset, Private: m.Private}
	}
	u := uffd.FromFD(fds[0], feat)
	if reattach {
		// A fault the dead server had read but not answered is in no
		// queue any more: wake every range, so such a thread touches its
		// page again and the fault comes to this server (a thread whose
		// page is still missing just faults again).
		for _, r := range ranges {
			if err := u.Wake(r.Base, uintptr(r.Size)); err != nil {
				u.Close()
				return nil, fmt.Errorf("reattach: wake the threads waiting in [%#x, +%d): %w", r.Base, r.Size, err)
			}
		}
	}
	v, err := s.b.AttachView(u, ranges, cn.info.Name)
	if err != nil {
		return nil, fmt.Errorf("attach view: %w", err)
	}
	cn.setInfo(func(ti *TargetInfo) { ti.Mappings = len(ranges) })
	cn.view.Store(&v)
	if err := cn.send(Reply{Type: TypeReady}); err != nil {
		v.Close()
		return nil, err
	}
	if reattach {
		cn.logf("re-attached: %d mapping(s)", len(ranges))
	} else {
		cn.logf("attached: %d mapping(s)", len(ranges))
	}
	return v, nil
}

// checkReattach checks that a reattach's backing is this server's: an adopting server adopts the
// first one handed back (PROTOCOL.md §5.1).
func (cn *conn) checkReattach(backing int) error {
	if ad, ok := cn.s.b.(Adopter); ok {
		if err := ad.Adopt(backing); err != nil {
			return err
		}
	}
	own := cn.s.b.BackingFile().Fd()
	if own < 0 {
		return errors.New("reattach: this server has no backing")
	}
	same, err := sameFile(own, backing)
	if err != nil {
		return fmt.Errorf("reattach: %w", err)
	}
	if !same {
		return fmt.Errorf("%w: it was restarted without --adopt (a server of its own backing), or another target handed back a different backing first: restart `uffdrestore load` with --adopt", ErrNotThisBacking)
	}
	return nil
}

// attached serves an attached target until it detaches or goes away; it
// returns why it ended. The view is closed on return.
func (cn *conn) attached(v View) string {
	s := cn.s
	defer v.Close()
	msgs := make(chan inMsg)
	go func() {
		for {
			raw, fds, err := RecvMsg(cn.c)
			CloseFDs(fds) // no message after attach carries an fd
			select {
			case msgs <- inMsg{raw, err}:
			case <-cn.done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	// Optional requests run on their own goroutines (a wait may take long;
	// stats meanwhile are answered); their replies are sent from here.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	replies := make(chan outMsg)
	stopping := s.stopping
	for {
		select {
		case r := <-replies:
			err := cn.send(r.v, r.fds...)
			CloseFDs(r.fds)
			if err != nil {
				return "hangup: " + err.Error()
			}
		case m := <-msgs:
			if m.err != nil {
				if errors.Is(m.err, ErrClosed) {
					return "hangup"
				}
				if errors.Is(m.err, ErrTooLarge) {
					cn.refuse(m.err)
					return "error: " + m.err.Error()
				}
				return "hangup: " + m.err.Error()
			}
			typ, err := PeekType(m.raw)
			if err != nil {
				cn.refuse(err)
				return "error: " + err.Error()
			}
			switch typ {
			case TypeStats:
				if err := cn.send(Reply{Type: TypeStats, Stats: statsJSON(v)}); err != nil {
					return "hangup: " + err.Error()
				}
			case TypeDetach:
				v.Close()
				cn.send(Reply{Type: TypeBye, Stats: statsJSON(v)})
				return "detach"
			case TypeWait, TypeProfile:
				if !cn.offers(typ) {
					err := invalid(typ, "type", "this server does not answer %q requests (its hello lists what it answers in \"requests\")", typ)
					cn.refuse(err)
					return "error: " + err.Error()
				}
				go func() {
					r := cn.answer(ctx, typ)
					select {
					case replies <- r:
					case <-ctx.Done():
						CloseFDs(r.fds)
					}
				}()
			default:
				err := invalid(typ, "type", "a %q message is not valid after ready (send stats or detach)", typ)
				cn.refuse(err)
				return "error: " + err.Error()
			}
		case <-v.Done():
			if err := v.Err(); err != nil {
				cn.refuse(fmt.Errorf("serving faults: %w", err))
				return "error: " + err.Error()
			}
			return "view closed"
		case <-stopping:
			stopping = nil
			cn.send(Reply{Type: TypeShutdown})
		case <-s.force:
			v.Close()
			cn.send(Reply{Type: TypeBye, Stats: statsJSON(v)})
			return "shutdown"
		}
	}
}

// outMsg is a reply to send, with its fds (closed once sent).
type outMsg struct {
	v   any
	fds []int
}

// offers reports whether the Backend answers the optional request typ.
func (cn *conn) offers(typ string) bool {
	if !slices.Contains(cn.s.b.Hello().Requests, typ) {
		return false
	}
	switch typ {
	case TypeWait:
		_, ok := cn.s.b.(Waiter)
		return ok
	case TypeProfile:
		_, ok := cn.s.b.(Profiler)
		return ok
	}
	return false
}

// answer runs an optional request: wait fills everything and replies
// {"type":"wait"}, with "error" and "code" when units failed; profile
// replies {"type":"profile"} with a memfd holding the profile's JSON (a
// profile may be larger than a message), or with "error".
func (cn *conn) answer(ctx context.Context, typ string) outMsg {
	switch typ {
	case TypeWait:
		if err := cn.s.b.(Waiter).Wait(ctx); err != nil {
			return outMsg{v: Reply{Type: TypeWait, Error: err.Error(), Code: ErrorCode(err)}}
		}
		return outMsg{v: Reply{Type: TypeWait}}
	default:
		p, err := cn.s.b.(Profiler).Profile()
		if err != nil {
			return outMsg{v: Reply{Type: TypeProfile, Error: err.Error(), Code: ErrorCode(err)}}
		}
		fd, err := profileFile(p)
		if err != nil {
			return outMsg{v: Reply{Type: TypeProfile, Error: err.Error(), Code: ErrorCode(err)}}
		}
		return outMsg{v: Reply{Type: TypeProfile}, fds: []int{fd}}
	}
}

// profileFile writes p's JSON into a new memfd, read from its start.
func profileFile(p format.Profile) (int, error) {
	b, err := json.Marshal(p)
	if err != nil {
		return -1, fmt.Errorf("attach: encode profile: %w", err)
	}
	fd, err := unix.MemfdCreate("uffdrestore-profile", unix.MFD_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("attach: profile: %w", os.NewSyscallError("memfd_create", err))
	}
	f := os.NewFile(uintptr(fd), "uffdrestore-profile")
	if _, err := f.Write(b); err != nil {
		f.Close()
		return -1, fmt.Errorf("attach: profile: write: %w", err)
	}
	nfd, err := unix.Dup(fd)
	f.Close()
	if err != nil {
		return -1, fmt.Errorf("attach: profile: %w", os.NewSyscallError("dup", err))
	}
	if _, err := unix.Seek(nfd, 0, 0); err != nil {
		unix.Close(nfd)
		return -1, fmt.Errorf("attach: profile: %w", os.NewSyscallError("lseek", err))
	}
	return nfd, nil
}

func statsJSON(v View) json.RawMessage {
	b, err := json.Marshal(v.Stats())
	if err != nil || string(b) == "null" {
		return json.RawMessage("{}")
	}
	return b
}

// uffdFeatureInitialized is the kernel's internal "UFFDIO_API done" bit
// of the features /proc/PID/fdinfo shows on newer kernels (6.18 here);
// older ones track that elsewhere and show the enabled features alone.
const uffdFeatureInitialized = 1 << 31

// enabledFeatures reads the features enabled on a userfaultfd of this
// process from the "API:" line of /proc/self/fdinfo/N ("API:\t<api>:<features>:<ioctls>",
// hex), and checks that UFFDIO_API was done with minor faults for backing.
func enabledFeatures(fd int, backing string) (uffd.Features, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", fd))
	if err != nil {
		return 0, fmt.Errorf("attach: read the userfaultfd's state: %w", err)
	}
	var feat uint64
	found := false
	for _, line := range strings.Split(string(b), "\n") {
		v, ok := strings.CutPrefix(line, "API:")
		if !ok {
			continue
		}
		parts := strings.Split(strings.TrimSpace(v), ":")
		if len(parts) == 3 {
			feat, err = strconv.ParseUint(parts[1], 16, 64)
			found = err == nil
		}
	}
	if !found {
		return 0, fmt.Errorf("attach: read the userfaultfd's state: no API line in /proc/self/fdinfo/%d", fd)
	}
	raw := feat
	feat &^= uffdFeatureInitialized
	required := uffd.FeatureMinorShmem
	if backing == BackingHugetlb {
		required = uffd.FeatureMinorHugetlbfs
	}
	if raw == 0 {
		return 0, invalid(TypeAttach, "fds", "the userfaultfd has had no UFFDIO_API (call it with the features of PROTOCOL.md section 4 before sending the userfaultfd)")
	}
	if uffd.Features(feat)&required != required {
		return 0, invalid(TypeAttach, "fds", "the userfaultfd's UFFDIO_API did not enable %s (features %#x): minor faults on this backing are required", featureName(required), feat)
	}
	return uffd.Features(feat), nil
}

func featureName(f uffd.Features) string {
	if f == uffd.FeatureMinorHugetlbfs {
		return "UFFD_FEATURE_MINOR_HUGETLBFS"
	}
	return "UFFD_FEATURE_MINOR_SHMEM"
}

func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	if cerr != nil {
		return nil, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return cred, nil
}

func uidList(u []uint32) string {
	u = slices.Clone(u)
	slices.Sort(u)
	u = slices.Compact(u)
	s := make([]string, len(u))
	for i, x := range u {
		s[i] = strconv.FormatUint(uint64(x), 10)
	}
	return strings.Join(s, ",")
}
