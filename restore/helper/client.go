package helper

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore/attach"
	"github.com/uffdrestore/uffdrestore/restore/internal/helperlink"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// handshakeTimeout bounds hello → ready, as a target's handshake is (a
// variable for the tests).
var handshakeTimeout = 10 * time.Second

// maxProfile bounds the profile a helper may hand back.
const maxProfile = 1 << 30

// ErrHelper: the helper process failed: it exited, refused the view, or
// broke the protocol. The error wraps the cause (attach.ErrClosed,
// attach.ErrInvalid, attach.ErrRefused with its code's sentinel).
var ErrHelper = errors.New("restore: the fault-handler helper failed")

// session is restore.Open's side of a helper: an attach client on a
// socketpair. Open returns once the helper is started; the handshake runs
// on (a touch of the view meanwhile waits in its fault, as PROTOCOL.md
// §3.3 allows), and every request waits for its ready first.
type session struct {
	proc   *child
	c      *net.UnixConn
	ready  chan struct{} // closed when the handshake ended (err set if it failed)
	done   chan struct{} // closed when the reader ended
	exited chan struct{} // closed when Close reaped the helper process

	mu       sync.Mutex
	err      error                         // why the session ended; nil while it runs
	pending  map[string][]chan attachReply // per reply type, oldest first
	requests []string                      // the optional requests the hello offered
	sendMu   sync.Mutex
	closed   sync.Once
	closing  bool // Close began: an end is not the helper going away
	onGone   func(helperlink.Session, error)
}

type attachReply struct {
	r   attach.Reply
	fds []int
	err error
}

// spawned is a helper process started ahead of its request (Spawn): its
// exec and Go runtime start overlap the caller's own work. It waits on its
// socket for a job message (its configuration, the snapshot and the
// backing), then serves as a helper started with them would.
type spawned struct {
	proc      *child
	mine      *os.File // this side of the socketpair
	abandoned sync.Once
}

// jobMsg is the first message to a spawned helper; the snapshot and the
// backing come with it (in that order).
type jobMsg struct {
	Type   string    `json:"type"` // "helper-job"
	Config envConfig `json:"config"`
}

const typeJob = "helper-job"

// spawn starts exe as a helper that waits for its job on fd 3.
func spawn(exe string) (helperlink.Spawned, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("restore: start the fault-handler helper: %w", os.NewSyscallError("socketpair", err))
	}
	theirs := os.NewFile(uintptr(fds[1]), "uffdrestore-helper-socket")
	defer theirs.Close()
	mine := os.NewFile(uintptr(fds[0]), "uffdrestore-helper-socket")
	js, err := json.Marshal(envConfig{Socket: 3, Job: true})
	if err != nil {
		mine.Close()
		return nil, fmt.Errorf("restore: helper configuration: %w", err)
	}
	env := []string{envName + "=" + string(js)}
	for _, kv := range os.Environ() {
		// The helper sizes its own runtime: the caller's GOMAXPROCS (1 in a
		// test, say) must not starve the fillers.
		if !strings.HasPrefix(kv, "GOMAXPROCS=") && !strings.HasPrefix(kv, envName+"=") {
			env = append(env, kv)
		}
	}
	proc, err := startChild(exe, env, theirs)
	if err != nil {
		mine.Close()
		return nil, fmt.Errorf("restore: start the fault-handler helper %s: %w", exe, err)
	}
	return &spawned{proc: proc, mine: mine}, nil
}

// child is a helper process being started (uffd.StartSpawn): its fork and
// exec run on a thread of their own, so that restore.Open does not wait
// for them (0.5-3.5 ms on a 2-vCPU VM, more than the rest of Open): the
// job and the attach wait in the socket until the helper reads them. The
// process is known once get has waited for the start.
type child struct {
	exe  string
	sp   *uffd.Spawning
	once sync.Once
	p    *os.Process
	err  error
}

// startChild starts exe as argv0 with env, stdin /dev/null, stdout and
// stderr this process's stderr, and sock as fd 3. What can be checked
// without running exe is checked here, so that a wrong helper path fails
// Open itself; a fork or exec failure comes later, from get (the helper's
// socket then reads as closed, and the session ends with that error).
func startChild(exe string, env []string, sock *os.File) (*child, error) {
	var st unix.Stat_t
	if err := unix.Stat(exe, &st); err != nil {
		return nil, &os.PathError{Op: "stat", Path: exe, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, &os.PathError{Op: "exec", Path: exe, Err: errors.New("not a regular file")}
	}
	if err := unix.Faccessat(unix.AT_FDCWD, exe, unix.X_OK, unix.AT_EACCESS); err != nil {
		return nil, &os.PathError{Op: "exec", Path: exe, Err: err}
	}
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	defer devNull.Close()
	fds := []int{int(devNull.Fd()), int(os.Stderr.Fd()), int(os.Stderr.Fd()), int(sock.Fd())}
	sp, err := uffd.StartSpawn(exe, []string{argv0}, env, fds)
	if err != nil {
		return nil, err
	}
	return &child{exe: exe, sp: sp}, nil
}

// get waits until the process is started and returns it, or why it could
// not be.
func (c *child) get() (*os.Process, error) {
	c.once.Do(func() {
		pid, err := c.sp.Wait()
		if err != nil {
			c.err = fmt.Errorf("restore: start the fault-handler helper %s: %w", c.exe, err)
			return
		}
		// Our child, not yet reaped: its pid cannot name another process.
		if c.p, err = os.FindProcess(pid); err != nil {
			syscall.Kill(pid, syscall.SIGKILL)
			var ws syscall.WaitStatus
			syscall.Wait4(pid, &ws, 0, nil)
			c.err = err
		}
	})
	return c.p, c.err
}

// Pid is the process's id (0 if it could not be started).
func (c *child) Pid() int {
	p, _ := c.get()
	if p == nil {
		return 0
	}
	return p.Pid
}

// Kill kills the process, if it was started.
func (c *child) Kill() {
	if p, _ := c.get(); p != nil {
		p.Kill()
	}
}

// Wait reaps the process (or returns why it could not be started).
func (c *child) Wait() error {
	p, err := c.get()
	if err != nil {
		return err
	}
	_, err = p.Wait()
	return err
}

// Pid is the process's id.
func (sp *spawned) Pid() int { return sp.proc.Pid() }

// Abandon hangs up (the helper, waiting for its job, exits) and reaps it
// in the background.
func (sp *spawned) Abandon() {
	sp.abandoned.Do(func() {
		sp.mine.Close()
		go func() {
			sp.proc.Kill()
			sp.proc.Wait()
		}()
	})
}

// refusal returns the error a helper that refused its job sent before it
// closed its end (waiting in sp's socket), or nil.
func refusal(sp *spawned) error {
	buf := make([]byte, attach.MaxMsgSize+1)
	n, _, _, _, err := unix.Recvmsg(int(sp.mine.Fd()), buf, nil, unix.MSG_DONTWAIT)
	if err != nil || n <= 0 {
		return nil
	}
	var r attach.Reply
	if attach.Decode(buf[:n], attach.TypeError, &r) != nil {
		return nil
	}
	return fmt.Errorf("%w: it refused its job: %w", ErrHelper, &attach.RefusedError{Text: r.Error, Code: r.Code})
}

// testAfterJob, when set (tests), runs between the job and the attach.
var testAfterJob func(pid int)

// start hands req to a helper (req.Spawned, else one started now): the
// job (configuration, snapshot, backing), then the attach of req's view;
// the handshake runs on in the background.
func start(ctx context.Context, req helperlink.Request) (_ helperlink.Session, err error) {
	sp, _ := req.Spawned.(*spawned)
	if req.Spawned != nil && sp == nil {
		req.Spawned.Abandon()
	}
	if err := ctx.Err(); err != nil {
		if sp != nil {
			sp.Abandon()
		}
		return nil, err
	}
	if sp == nil {
		s, err := spawn(req.Exe)
		if err != nil {
			return nil, err
		}
		sp = s.(*spawned)
	}
	defer func() {
		if err != nil {
			sp.Abandon()
		}
	}()
	var bst unix.Stat_t
	if err := unix.Fstat(int(req.Backing.Fd()), &bst); err != nil {
		return nil, fmt.Errorf("restore: backing: %w", os.NewSyscallError("fstat", err))
	}
	job := jobMsg{Type: typeJob, Config: envConfig{Workers: req.Workers, Loader: req.Config}}
	// The attach follows the job, ahead of the hello (it waits in the
	// socket): this side created the backing, so it knows what it maps,
	// and the helper must be able to serve the view without this process
	// (PROTOCOL.md §3.2: a goroutine that touches the view holds its P,
	// possibly the only one, until the fault is served, so nothing in this
	// process may be needed for that). The hello is still read and
	// checked, and ready awaited, before any request.
	a := attach.Attach{UffdFeatures: req.Features, Mappings: []attach.Mapping{{
		Region: attach.NoRegion, BaseHostVirtAddr: uint64(req.ViewAddr), Size: req.ViewSize, PageSize: req.PageSize,
	}}}
	var extraFDs []int
	if req.Reattach {
		// A new helper for a view whose helper died: a reattach, with the
		// backing (the helper checks it is the one it adopted), makes it
		// wake every thread waiting in the view once it can serve it.
		a.Type = attach.TypeReattach
		extraFDs = []int{int(req.Backing.Fd())}
	}
	deliver := func(sp *spawned) error {
		send := func(v any, fds ...int) error { return attach.SendMsgFD(int(sp.mine.Fd()), v, fds...) }
		fds := []int{int(req.Snapshot.Fd()), int(req.Backing.Fd())}
		if req.Journal != nil {
			fds = append(fds, int(req.Journal.Fd()))
		}
		if err := send(job, fds...); err != nil {
			return fmt.Errorf("%w: sending its job: %w", ErrHelper, err)
		}
		if testAfterJob != nil {
			testAfterJob(sp.proc.Pid())
		}
		if err := attach.SendAttach(send, a, req.Uffd, extraFDs...); err != nil {
			return fmt.Errorf("%w: sending the attach: %w", ErrHelper, err)
		}
		return nil
	}
	err = deliver(sp)
	if err != nil {
		if rerr := refusal(sp); rerr != nil {
			// It refused its job (and closed its end): its error, not
			// the broken pipe that followed.
			return nil, rerr
		}
		if _, serr := sp.proc.get(); serr != nil {
			// It never ran (its exec failed before the job was sent):
			// why, not the broken pipe; the same program would fail again.
			return nil, serr
		}
	}
	if err != nil && req.Spawned != nil && (errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)) {
		// A helper started ahead that died meanwhile (killed while it
		// waited; its socket may close between the job and the attach, as
		// a SIGKILL's exit runs after kill returns): a new one. What the
		// dead one was sent needs no undoing: it never held the uffd.
		sp.Abandon()
		ns, serr := spawn(req.Exe)
		if serr != nil {
			return nil, serr // (the deferred Abandon of the dead one does nothing more)
		}
		sp = ns.(*spawned)
		if err = deliver(sp); err != nil {
			if rerr := refusal(sp); rerr != nil {
				return nil, rerr
			}
		}
	}
	if err != nil {
		return nil, err
	}
	fc, err := net.FileConn(sp.mine)
	if err != nil {
		return nil, fmt.Errorf("restore: start the fault-handler helper: %w", err)
	}
	sp.mine.Close()
	s := &session{proc: sp.proc, c: fc.(*net.UnixConn), ready: make(chan struct{}), done: make(chan struct{}), exited: make(chan struct{}),
		pending: map[string][]chan attachReply{}, onGone: req.OnGone}
	go s.run(req, bst.Dev, bst.Ino)
	return s, nil
}

// run attaches the view, then reads the helper's messages until the
// session ends.
func (s *session) run(req helperlink.Request, dev, ino uint64) {
	defer close(s.done)
	if err := s.handshake(req, dev, ino); err != nil {
		if errors.Is(err, attach.ErrClosed) || errors.Is(err, syscall.ECONNRESET) {
			if _, serr := s.proc.get(); serr != nil {
				// It never ran: its socket closed with the spawn.
				err = serr
			}
			s.end(gone(err))
		} else {
			s.end(fmt.Errorf("%w: attaching the view: %w", ErrHelper, err))
		}
		close(s.ready)
		return
	}
	close(s.ready)
	for {
		raw, fds, err := attach.RecvMsg(s.c)
		if err != nil {
			s.end(gone(err))
			return
		}
		typ, err := attach.PeekType(raw)
		if err != nil {
			attach.CloseFDs(fds)
			s.end(fmt.Errorf("%w: %w", ErrHelper, err))
			return
		}
		switch typ {
		case attach.TypeShutdown:
			attach.CloseFDs(fds)
		case attach.TypeError:
			attach.CloseFDs(fds)
			var r attach.Reply
			json.Unmarshal(raw, &r)
			s.end(fmt.Errorf("%w: it ended the session: %w", ErrHelper, &attach.RefusedError{Text: r.Error, Code: r.Code}))
			return
		case attach.TypeStats, attach.TypeWait, attach.TypeProfile:
			var r attach.Reply
			err := attach.Decode(raw, typ, &r)
			s.mu.Lock()
			q := s.pending[typ]
			var ch chan attachReply
			if len(q) > 0 {
				ch, s.pending[typ] = q[0], q[1:]
			}
			s.mu.Unlock()
			if err == nil && ch == nil {
				err = fmt.Errorf("%w: attach: a %q reply came unasked", attach.ErrInvalid, typ)
			}
			if err != nil {
				attach.CloseFDs(fds)
				s.end(fmt.Errorf("%w: %w", ErrHelper, err))
				return
			}
			ch <- attachReply{r: r, fds: fds}
		default:
			attach.CloseFDs(fds)
			s.end(fmt.Errorf("%w: attach: a %q message is not valid from the helper after ready", ErrHelper, typ))
			return
		}
	}
}

// gone is the error of a helper whose socket closed: it exited (a reset
// is a close with our messages unread).
func gone(err error) error {
	if errors.Is(err, syscall.ECONNRESET) {
		err = attach.ErrClosed
	}
	return fmt.Errorf("%w: it exited: %w: %w", ErrHelper, helperlink.ErrGone, err)
}

// handshake receives the hello (checking it is the backing this side
// mapped and attached already) and waits for ready.
func (s *session) handshake(req helperlink.Request, dev, ino uint64) error {
	s.c.SetReadDeadline(time.Now().Add(handshakeTimeout))
	defer s.c.SetReadDeadline(time.Time{})
	recv := func() ([]byte, []int, error) { return attach.RecvMsg(s.c) }
	h, fds, err := attach.RecvHello(recv)
	defer attach.CloseFDs(fds)
	if err != nil {
		return err
	}
	var st unix.Stat_t
	switch {
	case len(fds) != 1:
		return &attach.ProtocolError{Msg: attach.TypeHello, Field: "fds", Text: fmt.Sprintf("%d file descriptors came with the hello, want 1", len(fds))}
	case unix.Fstat(fds[0], &st) != nil || st.Dev != dev || st.Ino != ino:
		return &attach.ProtocolError{Msg: attach.TypeHello, Field: "fds", Text: "the backing file is not the one this process created"}
	case h.FileSize != req.ViewSize || h.PageSize != req.PageSize:
		return &attach.ProtocolError{Msg: attach.TypeHello, Field: "file_size", Text: fmt.Sprintf("%d bytes of %d-byte pages, the view maps %d bytes of %d-byte pages", h.FileSize, h.PageSize, req.ViewSize, req.PageSize)}
	}
	raw, fds2, err := recv()
	attach.CloseFDs(fds2)
	if err != nil {
		return err
	}
	var r attach.Reply
	if err := attach.Decode(raw, attach.TypeReady, &r); err != nil {
		return err
	}
	s.mu.Lock()
	s.requests = h.Requests
	s.mu.Unlock()
	return nil
}

// end records why the session ended (the first reason) and fails every
// request waiting for a reply with it. The socket is closed: the helper
// sees a hangup.
func (s *session) end(err error) {
	s.mu.Lock()
	first := s.err == nil
	if first {
		s.err = err
	}
	err = s.err
	notify := first && !s.closing && s.onGone != nil && errors.Is(err, helperlink.ErrGone)
	pending := s.pending
	s.pending = map[string][]chan attachReply{}
	s.mu.Unlock()
	for _, q := range pending {
		for _, ch := range q {
			ch <- attachReply{err: err}
		}
	}
	s.c.Close()
	if notify {
		go s.onGone(s, err)
	}
}

// request sends a request of type typ and waits for its reply.
func (s *session) request(ctx context.Context, typ string) (attachReply, error) {
	select {
	case <-s.ready:
	case <-ctx.Done():
		return attachReply{}, fmt.Errorf("restore: waiting for the fault-handler helper to attach the view: %w", ctx.Err())
	}
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return attachReply{}, err
	}
	if typ != attach.TypeStats && !slices.Contains(s.requests, typ) {
		s.mu.Unlock()
		return attachReply{}, fmt.Errorf("%w: its hello does not offer %q requests", ErrHelper, typ)
	}
	ch := make(chan attachReply, 1)
	s.pending[typ] = append(s.pending[typ], ch)
	s.mu.Unlock()
	s.sendMu.Lock()
	s.c.SetWriteDeadline(time.Now().Add(handshakeTimeout))
	err := attach.SendMsg(s.c, attach.Reply{Type: typ})
	s.sendMu.Unlock()
	if err != nil {
		if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
			s.end(gone(err))
		} else {
			s.end(fmt.Errorf("%w: %w", ErrHelper, err))
		}
	}
	select {
	case rep := <-ch:
		return rep, rep.err
	case <-ctx.Done():
		// The reply, when it comes, goes to ch and is dropped.
		go func() { attach.CloseFDs((<-ch).fds) }()
		return attachReply{}, ctx.Err()
	}
}

func (s *session) Stats(ctx context.Context) (json.RawMessage, error) {
	rep, err := s.request(ctx, attach.TypeStats)
	if err != nil {
		return nil, err
	}
	return rep.r.Stats, nil
}

func (s *session) Wait(ctx context.Context) error {
	rep, err := s.request(ctx, attach.TypeWait)
	if err != nil {
		return err
	}
	if rep.r.Error != "" {
		return &attach.RemoteError{Text: rep.r.Error, Code: rep.r.Code}
	}
	return nil
}

func (s *session) Profile(ctx context.Context) (format.Profile, error) {
	rep, err := s.request(ctx, attach.TypeProfile)
	defer attach.CloseFDs(rep.fds)
	if err != nil {
		return format.Profile{}, err
	}
	if rep.r.Error != "" {
		return format.Profile{}, &attach.RemoteError{Text: rep.r.Error, Code: rep.r.Code}
	}
	if len(rep.fds) != 1 {
		return format.Profile{}, fmt.Errorf("%w: attach: profile reply: %d file descriptors, want 1", ErrHelper, len(rep.fds))
	}
	fd, err := unix.Dup(rep.fds[0])
	if err != nil {
		return format.Profile{}, os.NewSyscallError("dup", err)
	}
	f := os.NewFile(uintptr(fd), "uffdrestore-profile")
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxProfile+1))
	if err != nil {
		return format.Profile{}, fmt.Errorf("restore: profile from the fault-handler helper: %w", err)
	}
	if len(b) > maxProfile {
		return format.Profile{}, fmt.Errorf("%w: attach: profile reply: more than %d bytes", ErrHelper, maxProfile)
	}
	var p format.Profile
	if err := json.Unmarshal(b, &p); err != nil {
		return format.Profile{}, fmt.Errorf("%w: profile: %w", ErrHelper, err)
	}
	return p, nil
}

func (s *session) Pid() int { return s.proc.Pid() }

func (s *session) Ready() <-chan struct{} { return s.ready }

// Close hangs up (the helper's session ends, and it exits) and reaps the
// helper, killing it after 5 s.
func (s *session) Close() error {
	s.closed.Do(func() {
		s.mu.Lock()
		failed := s.err != nil
		s.closing = true
		s.mu.Unlock()
		s.end(os.ErrClosed)
		if failed {
			// A helper that failed has nothing left to serve.
			s.proc.Kill()
		}
		go func() { s.proc.Wait(); close(s.exited) }()
		select {
		case <-s.exited:
		case <-time.After(5 * time.Second):
			s.proc.Kill()
			<-s.exited
		}
		<-s.done
	})
	return nil
}
