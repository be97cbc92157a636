package engine

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// ViewRange is one mapping of the backing in a view: Size bytes of the
// backing at Offset, mapped at Base in the view's address space. The attach
// server hands a target's mappings to its Loader as these (attach.Range).
type ViewRange struct {
	Base    uintptr // where the view maps it
	Size    uint64  // bytes, a multiple of the page size
	Offset  uint64  // backing-file offset mapped at Base
	Private bool    // MAP_PRIVATE
}

// View is one address space whose faults the engine serves: an attached
// target process, or the in-process restore. It owns its userfaultfd.
type View struct {
	e      *engine
	name   string
	u      *uffd.FD
	ranges atomic.Pointer[[]ViewRange] // sorted by Base; replaced on remap/unmap
	// The fault loop waits for faults in Go's network poller, on pf (a
	// duplicate of u's descriptor): a goroutine parked there holds no P
	// and no thread. Blocking in poll(2) instead left a P in a system call
	// that the runtime's monitor took back every 20 µs, keeping it awake
	// at that rate: on two vCPUs each of its wakeups preempted a filler
	// (measured: ~10,000 context switches in a 1 GiB sequential lazy
	// restore, 44% the monitor's; fills 40% slower than without faults).
	// kick interrupts the wait with a read deadline in the past.
	wakeMu sync.Mutex
	pf     *os.File // nil once closed
	prc    syscall.RawConn
	kicked atomic.Bool
	// waitFn is the poller callback of wait (made once: the fault path
	// allocates nothing); waitHup and waitErr are what its first call's
	// poll(2) found.
	waitFn    func(uintptr) bool
	waitFirst bool
	waitHup   bool
	waitErr   error
	c         counters
	dead      atomic.Bool
	// mapped has a bit per unit this view has fully mapped: a fault there
	// (a thread that raced the CONTINUE, or a page a target zapped) needs
	// one single-page CONTINUE, not a walk of the unit. Cleared on remove,
	// unmap and remap events.
	mapped []atomic.Uint64

	childMu  sync.Mutex
	children []*View // views of forked children: they stop with this one

	// retry holds faults whose CONTINUE the kernel refused with EAGAIN: the
	// address space is changing (an unmap, remap or remove event is pending
	// on this uffd) and only this view's fault loop, by reading that event,
	// lets it settle. The loop answers them again after its next read.
	retryMu sync.Mutex
	retry   []waiter
	retryN  atomic.Int32

	// strays counts faults outside every range since strayT0, each less
	// than strayGap after the previous one (at strayLast), with no remap or
	// unmap event read in between (fault loop only).
	strays    int
	strayT0   int64
	strayLast int64

	ra raState // fault loop only, but gen

	done      chan struct{}
	closeOnce sync.Once
	loopDone  chan struct{}
	errMu     sync.Mutex
	err       error
}

// validateRanges checks ranges against the backing: page aligned, inside
// the file, not overlapping.
func validateRanges(ranges []ViewRange, pageSize int, fileSize int64) error {
	if len(ranges) == 0 {
		return errors.New("restore: view has no ranges")
	}
	ps := uint64(pageSize)
	s := append([]ViewRange(nil), ranges...)
	sort.Slice(s, func(i, j int) bool { return s[i].Base < s[j].Base })
	for i, r := range s {
		switch {
		case r.Size == 0:
			return fmt.Errorf("restore: range %d: size is 0", i)
		case uint64(r.Base)%ps != 0 || r.Offset%ps != 0 || r.Size%ps != 0:
			return fmt.Errorf("restore: range at %#x: base %#x, offset %#x and size %#x must be multiples of the page size %#x", r.Base, r.Base, r.Offset, r.Size, ps)
		case r.Offset > uint64(fileSize) || r.Size > uint64(fileSize)-r.Offset:
			return fmt.Errorf("restore: range at %#x: offset %#x + size %#x is outside the backing (%#x bytes)", r.Base, r.Offset, r.Size, fileSize)
		case uint64(r.Base)+r.Size < uint64(r.Base):
			return fmt.Errorf("restore: range at %#x: size %#x wraps the address space", r.Base, r.Size)
		case i > 0 && uint64(s[i-1].Base)+s[i-1].Size > uint64(r.Base):
			return fmt.Errorf("restore: ranges at %#x and %#x overlap", s[i-1].Base, r.Base)
		}
	}
	return nil
}

// newView starts serving u's faults for ranges. It takes ownership of u.
func (e *engine) newView(u *uffd.FD, ranges []ViewRange, name string) (*View, error) {
	if err := validateRanges(ranges, e.b.pageSize, e.b.size); err != nil {
		u.Close()
		return nil, err
	}
	if err := unix.SetNonblock(u.Fd(), true); err != nil {
		u.Close()
		return nil, os.NewSyscallError("fcntl O_NONBLOCK", err)
	}
	pf, prc, err := pollFile(u.Fd())
	if err != nil {
		u.Close()
		return nil, err
	}
	v := &View{e: e, name: name, u: u, pf: pf, prc: prc, done: make(chan struct{}), loopDone: make(chan struct{}),
		mapped: make([]atomic.Uint64, (e.nUnits+63)/64)}
	v.waitFn = func(uintptr) bool {
		if !v.waitFirst {
			return true // the poller saw an edge
		}
		// The poller forgets every edge before its first call (it
		// expects this call to read), so one that came after the loop's
		// last read would be lost: look at the level instead of reading.
		v.waitFirst = false
		ready, _, hup, err := uffd.Poll(v.u.Fd(), -1, 0)
		v.waitHup, v.waitErr = hup, err
		return ready || hup || err != nil
	}
	s := append([]ViewRange(nil), ranges...)
	sort.Slice(s, func(i, j int) bool { return s[i].Base < s[j].Base })
	v.ranges.Store(&s)
	e.addView(v)
	// Units already present (eager, prefetch, other targets) are mapped now,
	// so touching them costs no fault.
	if e.cfg.premap {
		for u := range e.state {
			if e.state[u].Load() == stPresent {
				v.continueUnit(uint32(u), 0)
				v.c.premapped.Add(1)
			}
		}
	}
	go v.loop()
	return v, nil
}

// pollFile returns a duplicate of the (non-blocking) userfaultfd fd in Go's
// network poller, to wait on.
func pollFile(fd int) (*os.File, syscall.RawConn, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", err)
	}
	f := os.NewFile(uintptr(dup), "userfaultfd")
	rc, err := f.SyscallConn()
	if err == nil {
		// Not in the poller (a file the runtime cannot epoll) would make
		// every wait fail: find out now.
		if err = f.SetReadDeadline(time.Time{}); err != nil {
			err = fmt.Errorf("restore: userfaultfd cannot be waited on in the poller: %w", err)
		}
	}
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, rc, nil
}

// Done is closed when the view stops: its uffd hung up (the target exited),
// it failed, or Close was called.
func (v *View) Done() <-chan struct{} { return v.done }

// Err is why the view stopped, or nil.
func (v *View) Err() error {
	v.errMu.Lock()
	defer v.errMu.Unlock()
	return v.err
}

// Name is the view's name (the target's description).
func (v *View) Name() string { return v.name }

// Stats returns this view's fault figures and the engine's fill figures.
func (v *View) Stats() Stats {
	s := Stats{Mode: v.e.cfg.mode.String(), Backing: v.e.b.kind.String(), Chunks: v.e.r.NumChunks(), Units: v.e.nUnits, Views: 1}
	v.c.fill(&s)
	s.UnitsPresent = v.e.present.Load()
	return s
}

// Close stops serving the view and closes its uffd. Threads still waiting
// on one of its faults stay blocked until their process exits or another
// handler resolves them. Close is idempotent.
func (v *View) Close() error {
	first := false
	v.closeOnce.Do(func() {
		first = true
		v.dead.Store(true)
		v.kick()
	})
	<-v.loopDone
	if !first {
		return os.ErrClosed
	}
	return nil
}

// fail ends the view because one of its faults cannot be answered with
// verified bytes or SIGBUS. The error becomes the engine's last error and
// the view's Err (the attach server logs it and sends it to the target
// before closing the session). The faulting thread stays blocked, never
// reading wrong bytes, until its process exits.
func (v *View) fail(err error) {
	err = fmt.Errorf("restore: view %s ended: %w", v.name, err)
	v.e.setErr(err)
	v.stop(err)
	v.kick()
}

func (v *View) stop(err error) {
	v.errMu.Lock()
	if v.err == nil {
		v.err = err
	}
	v.errMu.Unlock()
	v.dead.Store(true)
}

// loop is the fault loop: it reads fault messages in batches and hands each
// to the engine. When the uffd is empty it waits in the poller at once
// (unless WithSpin asks it to spin first): a busy poll did not lower the
// fault latency on the machines measured (see the package documentation,
// "No spinning").
func (v *View) loop() {
	defer func() {
		v.childMu.Lock()
		children := v.children
		v.children = nil
		v.childMu.Unlock()
		for _, c := range children {
			c.Close()
		}
		v.e.removeView(v)
		v.u.Close()
		v.wakeMu.Lock()
		v.pf.Close()
		v.pf = nil
		v.wakeMu.Unlock()
		close(v.done)
		close(v.loopDone)
	}()
	buf := uffd.NewMsgBuf(64)
	msgs := make([]uffd.Msg, 64)
	v.e.servingAt.CompareAndSwap(0, time.Now().UnixNano())
	spin := int64(v.e.cfg.spin)
	var idleSince int64 = -1
	for !v.dead.Load() {
		n, err := v.u.ReadMsgs(buf, msgs)
		if err != nil {
			if !errors.Is(err, uffd.ErrHangup) {
				v.stop(fmt.Errorf("restore: view %s: %w", v.name, err))
			} else {
				v.stop(nil)
			}
			return
		}
		if n == 0 {
			if v.retryN.Load() > 0 {
				// Faults refused with EAGAIN: the event that refused them
				// has been read by now (or is about to arrive): try again,
				// pausing briefly so a refusal that persists is no spin.
				if v.runRetries() {
					uffd.Poll(v.u.Fd(), -1, 1)
				}
				continue
			}
			now := v.e.now()
			if idleSince < 0 {
				idleSince = now
			}
			if now-idleSince < spin {
				continue
			}
			hup, err := v.wait()
			if err != nil {
				v.stop(fmt.Errorf("restore: view %s: %w", v.name, err))
				return
			}
			if v.dead.Load() {
				return
			}
			if hup {
				v.stop(nil)
				return
			}
			idleSince = -1
			continue
		}
		idleSince = -1
		t0 := v.e.now()
		for i := 0; i < n; i++ {
			v.handle(&msgs[i], t0)
		}
	}
}

func (v *View) handle(m *uffd.Msg, t0 int64) {
	switch m.Event {
	case uffd.EventPagefault:
		if m.Flags&uffd.PFMinor != 0 {
			v.c.faultsMinor.Add(1)
		} else {
			v.c.faultsMissing.Add(1)
		}
		addr := uintptr(m.Address)
		off, ok := v.offsetOf(addr)
		if !ok {
			v.stray(addr, t0)
			return
		}
		if v.e.rec != nil {
			v.e.rec.note(int(off / uint64(v.e.chunkSize)))
		}
		u := uint32(off / uint64(v.e.unitSize))
		if v.e.firstReadAt.Load() == 0 && v.e.firstReadAt.CompareAndSwap(0, time.Now().UnixNano()) {
			v.e.firstFaultUnit.Store(int64(u) + 1)
		}
		v.e.request(v, u, addr, t0)
		v.readahead(u)
	case uffd.EventRemap:
		v.strays = 0
		v.forgetMapped()
		v.remap(uintptr(m.RemapFrom), uintptr(m.RemapTo), uintptr(m.RemapLen))
	case uffd.EventUnmap:
		v.strays = 0
		v.forgetMapped()
		v.unmap(uintptr(m.Start), uintptr(m.End))
	case uffd.EventRemove:
		v.forgetMapped()
		// MADV_DONTNEED zaps page tables: the next touch is a minor fault.
		// MADV_REMOVE also punches the page cache: CONTINUE then fails and
		// the unit is filled again (see engine.refill).
	case uffd.EventFork:
		child := uffd.FromFD(int(m.ForkUFD), v.u.Features())
		rs := *v.ranges.Load()
		cv, err := v.e.newView(child, rs, v.name+"/fork")
		if err != nil {
			v.e.setErr(fmt.Errorf("restore: view %s: serve forked child: %w", v.name, err))
			return
		}
		v.childMu.Lock()
		v.children = append(v.children, cv)
		v.childMu.Unlock()
	}
}

// raStartRun is how many faults on consecutive units start readahead: with
// two, a sparse pattern that touches two neighbours now and then would read
// a window ahead for nothing.
const raStartRun = 3

// raState is a view's readahead: the fault loop's view of the pattern.
type raState struct {
	last    uint32 // unit of the last fault
	started bool   // last is valid
	run     int    // faults on consecutive units so far
	win     int    // current window, in units (0: no readahead)
	start   uint32 // the latest window is [start, end)
	end     uint32
	gen     atomic.Uint32 // bumped when the pattern breaks: queued readahead is dropped
}

// readahead follows the view's faults (fault loop only). Faults on
// raStartRun consecutive units start a window of units after the last; a fault on
// the latest window's first absent unit (left unmapped for that: the
// marker) or past it doubles the window and queues the next one after it.
// Faults that skip forward up to the window's end (over units mapped
// ahead) or land inside the latest window stay in order; a fault anywhere
// else ends readahead, and the queued units not yet claimed are dropped.
func (v *View) readahead(u uint32) {
	ra, e := &v.ra, v.e
	if h := e.hooks; h != nil && h.noReadahead {
		return
	}
	if ra.started && u == ra.last {
		return // another page or thread of the same unit
	}
	// In order: the next unit, or any unit further on up to the window's
	// end (the units between were mapped ahead, so they took no fault), or
	// one inside the latest window (threads whose faults arrive out of
	// order).
	seq := ra.started && (u == ra.last+1 || (ra.win > 0 && u <= ra.end && (u > ra.last || u >= ra.start)))
	ra.last, ra.started = u, true
	if !seq {
		if ra.win > 0 {
			ra.gen.Add(1)
		}
		ra.win, ra.start, ra.end, ra.run = 0, 0, 0, 1
		return
	}
	if ra.run++; ra.run < raStartRun {
		return
	}
	if ra.win > 0 && u < ra.start {
		return // inside the window, before its marker
	}
	if ra.win == 0 {
		ra.win = e.raInitUnits()
	} else {
		ra.win = min(2*ra.win, e.raMaxUnits())
	}
	start := max(u+1, ra.end)
	end := uint32(min(int(start)+ra.win, e.nUnits))
	if start >= end {
		return
	}
	gen := ra.gen.Load()
	marked := false
	for n := start; n < end; n++ {
		if e.state[n].Load() != stAbsent {
			continue
		}
		if !marked {
			e.raMarker[n].Store(v)
		}
		select {
		case e.raq <- raReq{u: n, gen: gen, v: v}:
			marked = true
		default:
			// Full: the workers are behind; the faults will catch up.
			if !marked {
				e.raMarker[n].CompareAndSwap(v, nil)
			}
			end = n
		}
	}
	ra.start, ra.end = start, end
}

// Faults outside every range of a view may go on for strayLimit (and at
// least strayCount of them) with no remap or unmap event that could explain
// them; one more than strayGap after the previous one starts a new count.
const (
	strayLimit = 50 * time.Millisecond
	strayCount = 64
	strayGap   = time.Second
)

// stray handles a fault outside every range of the view. Right after an
// mremap or munmap that can be a fault read before the event that moves the
// range: waking it makes the thread fault again, at the new address or
// raising SIGSEGV. Faults that go on with no such event come from memory
// the target registered on its userfaultfd but did not attach: answering
// them (read, wake, read again) would spin a server core for as long as the
// target lives, so the view is ended instead.
func (v *View) stray(addr uintptr, t0 int64) {
	if v.strays == 0 || time.Duration(t0-v.strayLast) > strayGap {
		v.strays, v.strayT0 = 0, t0
	}
	v.strays++
	v.strayLast = t0
	if v.strays >= strayCount && time.Duration(t0-v.strayT0) >= strayLimit {
		v.fail(fmt.Errorf("the target faults at %#x, outside every mapping it attached (%d such faults in %v with no remap or unmap): "+
			"it registered memory on its userfaultfd that it did not list in the attach message; attach every registered range",
			addr, v.strays, time.Duration(t0-v.strayT0).Round(time.Millisecond)))
		return
	}
	if err := v.u.Wake(addr&^uintptr(v.e.b.pageSize-1), uintptr(v.e.b.pageSize)); err != nil && !v.dead.Load() {
		v.fail(fmt.Errorf("wake the fault at %#x outside every mapping: %w", addr, err))
	}
}

// deferFault queues a fault whose CONTINUE got EAGAIN and wakes the fault
// loop, which answers it again after reading the pending events.
func (v *View) deferFault(u uint32, addr uintptr, t0 int64) {
	v.retryMu.Lock()
	v.retry = append(v.retry, waiter{unit: u, v: v, addr: addr, t0: t0})
	v.retryN.Store(int32(len(v.retry)))
	v.retryMu.Unlock()
	v.kick()
}

// wait parks the fault loop until its uffd is readable or kick is called
// (fault loop only; the uffd was found empty). hup: the uffd reports an
// error or hangup (poll(2) says so, e.g. a target made the shared file
// description blocking), which ends the view. One poll(2) per wait: a
// hangup that comes while the loop is parked wakes it as readable, its
// read finds nothing, and the next wait's poll(2) sees the hangup.
func (v *View) wait() (hup bool, err error) {
	// The deadline is cleared before the flag is read: a kick after this
	// point sets a new one, so none is lost.
	if err := v.pf.SetReadDeadline(time.Time{}); err != nil {
		return false, err
	}
	if v.kicked.Swap(false) || v.dead.Load() {
		return false, nil
	}
	v.waitFirst, v.waitHup, v.waitErr = true, false, nil
	err = v.prc.Read(v.waitFn)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		v.kicked.Store(false)
		return false, nil
	}
	if err != nil {
		// The poller refuses a file it saw an error on (EPOLLERR): a
		// hangup, if poll(2) says so, ends the view as one.
		if _, _, hup, perr := uffd.Poll(v.u.Fd(), -1, 0); perr == nil && hup {
			return true, nil
		}
		return false, err
	}
	return v.waitHup, v.waitErr
}

// kick wakes the fault loop out of its wait.
func (v *View) kick() {
	v.wakeMu.Lock()
	v.kicked.Store(true)
	if v.pf != nil {
		v.pf.SetReadDeadline(time.Unix(1, 0))
	}
	v.wakeMu.Unlock()
}

// runRetries answers the deferred faults again. It reports whether some
// were deferred once more.
func (v *View) runRetries() bool {
	v.retryMu.Lock()
	list := v.retry
	v.retry = nil
	v.retryN.Store(0)
	v.retryMu.Unlock()
	for _, w := range list {
		v.e.request(v, w.unit, w.addr, w.t0)
	}
	return v.retryN.Load() > 0
}

// offsetOf maps an address of the view to a backing offset.
func (v *View) offsetOf(addr uintptr) (uint64, bool) {
	rs := *v.ranges.Load()
	i := sort.Search(len(rs), func(i int) bool { return rs[i].Base+uintptr(rs[i].Size) > addr })
	if i < len(rs) && rs[i].Base <= addr {
		return rs[i].Offset + uint64(addr-rs[i].Base), true
	}
	return 0, false
}

// continueUnit maps unit u into every range of the view that covers it.
// When addr is not 0 it is a faulting address that must end up mapped and
// woken, whatever else was mapped already.
func (v *View) continueUnit(u uint32, addr uintptr) error {
	us := uint64(v.e.unitSize)
	ustart, uend := uint64(u)*us, uint64(u+1)*us
	ps := uintptr(v.e.b.pageSize)
	word, bit := &v.mapped[u/64], uint64(1)<<(u%64)
	if word.Load()&bit != 0 {
		if addr == 0 {
			return nil // premap of a unit this view has mapped already
		}
		return v.continuePage(u, addr)
	}
	var firstErr error
	complete := true
	for _, r := range *v.ranges.Load() {
		lo, hi := max(ustart, r.Offset), min(uend, r.Offset+r.Size)
		if lo >= hi {
			continue
		}
		start := r.Base + uintptr(lo-r.Offset)
		n := uintptr(hi - lo)
		calls, err := v.u.ContinueRange(start, n, ps)
		v.c.continues.Add(int64(calls))
		if err != nil {
			if e := v.continueFailed(err); e != nil {
				return e
			}
			switch {
			case errors.Is(err, unix.ENOENT):
				// Part of the range is no longer one registered
				// mapping (unmapped under us, or the target changed
				// it behind our back): map the faulting page alone.
				complete = false
				if addr >= start && addr < start+n {
					return v.continuePage(u, addr)
				}
				continue
			}
			if firstErr == nil {
				firstErr = fmt.Errorf("map unit %d at %#x: %w", u, start, err)
			}
			continue
		}
		// Some pages were mapped already (a race with another fill, or a
		// target that zapped part of the unit): the CONTINUE that mapped
		// the rest did not wake a thread waiting on one of those.
		if calls > 1 && addr >= start && addr < start+n {
			pg := addr &^ (ps - 1)
			v.u.Wake(pg, ps)
		}
	}
	if firstErr == nil && complete {
		for {
			w := word.Load()
			if word.CompareAndSwap(w, w|bit) {
				break
			}
		}
	}
	return firstErr
}

// continueFailed classifies a failed CONTINUE the same way for a range and
// a page: the page cache lost the page (EFAULT: fill again), the kernel
// asks to retry (EAGAIN), or the target's address space is gone (ESRCH,
// ENOSPC: the view stops). Any other error is the caller's (nil).
func (v *View) continueFailed(err error) error {
	switch {
	case errors.Is(err, unix.EFAULT):
		return errRefill
	case errors.Is(err, unix.EAGAIN):
		return errRetry
	case errors.Is(err, unix.ESRCH), errors.Is(err, unix.ENOSPC):
		v.stop(nil) // the target's address space is gone
		return errGone
	}
	return nil
}

// continuePage maps the page at faulting address addr (in unit u) and
// wakes its thread.
func (v *View) continuePage(u uint32, addr uintptr) error {
	ps := uintptr(v.e.b.pageSize)
	pg := addr &^ (ps - 1)
	out, err := v.u.Continue(pg, ps, false)
	v.c.continues.Add(1)
	if err != nil {
		if e := v.continueFailed(err); e != nil {
			return e
		}
	}
	switch {
	case err == nil && out == uffd.AlreadyMapped:
		if err := v.u.Wake(pg, ps); err != nil {
			return fmt.Errorf("wake the fault at %#x: %w", addr, err)
		}
	case err == nil:
	case errors.Is(err, unix.ENOENT):
		// Unmapped under us: the woken thread faults again on
		// whatever is there now (SIGSEGV if nothing).
		v.u.Wake(pg, ps)
	default:
		return fmt.Errorf("map the fault at %#x (unit %d): %w", addr, u, err)
	}
	return nil
}

// forgetMapped clears the mapped bits: after a remove, unmap or remap event
// the view's page tables no longer match them.
func (v *View) forgetMapped() {
	for i := range v.mapped {
		v.mapped[i].Store(0)
	}
}

// poison makes unit u raise SIGBUS in this view. Without UFFDIO_POISON
// (Linux < 6.6, or DisablePoisonEnv) it returns the unit's error, and the
// view ends: a blocked thread is safer than wrong bytes.
func (v *View) poison(u uint32, addr uintptr) error {
	if v.e.poisonOff {
		return fmt.Errorf("%w; without UFFDIO_POISON (Linux >= 6.6; off when %s=1) the fault at %#x cannot be answered with SIGBUS", v.e.unitError(u), DisablePoisonEnv, addr)
	}
	us := uint64(v.e.unitSize)
	ustart, uend := uint64(u)*us, uint64(u+1)*us
	for _, r := range *v.ranges.Load() {
		lo, hi := max(ustart, r.Offset), min(uend, r.Offset+r.Size)
		if lo >= hi {
			continue
		}
		start := r.Base + uintptr(lo-r.Offset)
		if err := v.u.Poison(start, uintptr(hi-lo), false); err != nil {
			switch {
			case errors.Is(err, unix.EAGAIN):
				return errRetry
			case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ESRCH):
				continue
			}
			return fmt.Errorf("%w; poisoning it at %#x failed: %v", v.e.unitError(u), start, err)
		}
	}
	v.c.poisoned.Add(1)
	return nil
}

// remap follows an mremap of part of the view.
func (v *View) remap(from, to, n uintptr) {
	v.replaceRanges(func(r ViewRange) []ViewRange { return splitRange(r, from, from+n, to) })
}

// unmap forgets an unmapped part of the view.
func (v *View) unmap(start, end uintptr) {
	v.replaceRanges(func(r ViewRange) []ViewRange { return splitRange(r, start, end, 0) })
}

func (v *View) replaceRanges(f func(ViewRange) []ViewRange) {
	old := *v.ranges.Load()
	var out []ViewRange
	for _, r := range old {
		out = append(out, f(r)...)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Base < out[j].Base })
	v.ranges.Store(&out)
}

// splitRange cuts [lo, hi) out of r. With moveTo != 0 the cut part moves
// there (mremap); otherwise it is dropped (munmap).
func splitRange(r ViewRange, lo, hi, moveTo uintptr) []ViewRange {
	end := r.Base + uintptr(r.Size)
	if hi <= r.Base || lo >= end {
		return []ViewRange{r}
	}
	clo, chi := max(lo, r.Base), min(hi, end)
	var out []ViewRange
	if clo > r.Base {
		out = append(out, ViewRange{Base: r.Base, Size: uint64(clo - r.Base), Offset: r.Offset, Private: r.Private})
	}
	if moveTo != 0 {
		out = append(out, ViewRange{Base: moveTo + (clo - lo), Size: uint64(chi - clo), Offset: r.Offset + uint64(clo-r.Base), Private: r.Private})
	}
	if chi < end {
		out = append(out, ViewRange{Base: chi, Size: uint64(end - chi), Offset: r.Offset + uint64(chi-r.Base), Private: r.Private})
	}
	return out
}
