package engine

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
	"golang.org/x/sys/unix"
)

// Unit states. A unit is the fill granularity: max(chunk size, page size),
// so that one UFFDIO_CONTINUE covers whole pages.
const (
	stAbsent uint32 = iota
	stFilling
	stPresent
	stPoisoned
)

// engine fills units of a backing from a snapshot and resolves the faults of
// the views registered on it. It is shared by the out-of-process server (one
// view per attached target) and the in-process helper (one view).
type engine struct {
	r     *format.Reader
	b     *backing
	alias *uffd.Mapping
	cfg   config

	chunkSize     int
	unitSize      int
	chunksPerUnit int
	nUnits        int
	state         []atomic.Uint32
	partial       []atomic.Bool // unit is being filled again after a punch
	shards        [64]waitShard

	faultq        chan uint32
	raq           chan raReq             // readahead: units to fill ahead of sequential faults
	raMarker      []atomic.Pointer[View] // readahead fills these without premapping them into that view (see View.readahead)
	splitq        chan splitReq          // parts of fault units for idle workers (see splitJob)
	nWorkers      int
	raWorkers     int // workers that take readahead work (the others stay free for faults)
	prefetchOrder []uint32
	prefetchNext  atomic.Int64
	prefetchLimit atomic.Int64
	moreWork      chan struct{}
	moreWorkAll   chan struct{}
	moreWorkOnce  sync.Once
	ws            *wsState
	rec           *recorder
	fetchSem      chan struct{} // remote snapshot: prefetch reads in flight (see fillBatchRemote)
	prefetchOnce  sync.Once
	prefetchOn    chan struct{}

	present    atomic.Int64
	allPresent chan struct{}
	allOnce    sync.Once
	fillStart  atomic.Int64 // e.now() when prefetch started, 0 before
	fillTime   atomic.Int64

	viewsMu sync.RWMutex
	views   []*View
	retired counters // counters of views that are gone

	c          counters
	errMu      sync.Mutex
	lastErr    error
	unitErr    map[uint32]error // why each poisoned unit failed
	poisonOff  bool             // answer poisoned units by ending the view, not with UFFDIO_POISON
	noPopulate atomic.Bool      // the kernel lacks MADV_POPULATE_WRITE
	hooks      *engineHooks     // nil outside tests
	journal    *fillJournal     // WithFillJournal, else nil

	stop    chan struct{}
	workers sync.WaitGroup
	epoch   time.Time
	// firstFault is when (Unix ns, wall clock: a parent process compares
	// it with its own Open's start) the first fault was answered; 0: none yet.
	firstFault atomic.Int64
	// Where the first byte's wait went (Unix ns, wall clock, 0: not yet;
	// see FirstByteTrace): the first view's fault loop running, the first
	// fault read, and the fill of the unit it asked for begun and done.
	createdAt, servingAt, firstReadAt, firstFillAt, firstFilledAt atomic.Int64
	firstFaultUnit                                                atomic.Int64 // the first fault's unit + 1
}

type waitShard struct {
	mu sync.Mutex
	w  []waiter
	_  [40]byte // keep shards on separate cache lines
}

type waiter struct {
	unit uint32
	v    *View
	addr uintptr
	t0   int64
}

func newEngine(r *format.Reader, b *backing, cfg config) (_ *engine, err error) {
	e := &engine{r: r, b: b, cfg: cfg, chunkSize: r.ChunkSize(), epoch: time.Now(), unitErr: map[uint32]error{}}
	e.poisonOff = !poisonAvailable()
	e.unitSize = max(e.chunkSize, b.pageSize)
	if e.unitSize%e.chunkSize != 0 || e.unitSize%b.pageSize != 0 {
		return nil, fmt.Errorf("restore: chunk size %d and page size %d do not nest", e.chunkSize, b.pageSize)
	}
	e.chunksPerUnit = e.unitSize / e.chunkSize
	e.nUnits = int((r.TotalSize() + uint64(e.unitSize) - 1) / uint64(e.unitSize))
	if int64(e.nUnits)*int64(e.unitSize) > b.size {
		return nil, fmt.Errorf("restore: backing of %d bytes is smaller than the snapshot's %d units of %d bytes", b.size, e.nUnits, e.unitSize)
	}
	e.state = make([]atomic.Uint32, e.nUnits)
	e.partial = make([]atomic.Bool, e.nUnits)
	for i := range e.shards {
		e.shards[i].w = make([]waiter, 0, 8)
	}
	e.faultq = make(chan uint32, e.nUnits+1)
	e.raq = make(chan raReq, 2*e.raMaxUnits())
	e.raMarker = make([]atomic.Pointer[View], e.nUnits)
	e.prefetchOn = make(chan struct{})
	e.allPresent = make(chan struct{})
	e.stop = make(chan struct{})
	if e.nUnits == 0 {
		close(e.allPresent)
	}
	if b.size > 0 {
		e.alias, err = uffd.Mmap(0, int(b.size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, b.fd.Fd(), 0)
		if err != nil {
			if errors.Is(err, unix.ENOMEM) && b.kind.hugetlb() {
				return nil, fmt.Errorf("%w: mapping %d MiB of huge pages failed (another process took them?): %v; "+
					"reserve more with `echo N > /proc/sys/vm/nr_hugepages` or use --backing shmem", ErrNoHugePages, b.size>>20, err)
			}
			return nil, fmt.Errorf("restore: map backing: %w", err)
		}
	}
	if cfg.fetchParallel > 0 {
		e.fetchSem = make(chan struct{}, max(1, cfg.fetchParallel-1))
	}
	e.moreWork = make(chan struct{}, 1)
	e.moreWorkAll = make(chan struct{})
	if err := e.setupWorkingSet(); err != nil {
		e.alias.Close()
		return nil, err
	}
	if cfg.record != "" {
		e.rec = newRecorder(r.NumChunks(), e.epoch)
	}
	workers := cfg.workers
	if workers <= 0 {
		workers = runtime.NumCPU()
	}
	e.nWorkers = workers
	e.splitq = make(chan splitReq, 4*workers)
	for i := 0; i < workers; i++ {
		e.workers.Add(1)
		go e.worker()
	}
	e.createdAt.Store(time.Now().UnixNano())
	return e, nil
}

func (e *engine) now() int64 { return int64(time.Since(e.epoch)) }

func (e *engine) setErr(err error) {
	e.c.errors.Add(1)
	e.errMu.Lock()
	e.lastErr = err
	e.errMu.Unlock()
}

// Err returns the last error the engine met (a corrupt chunk, an I/O error).
func (e *engine) err() error {
	e.errMu.Lock()
	defer e.errMu.Unlock()
	return e.lastErr
}

// startPrefetch makes idle workers fill absent units in prefetch order.
// Faults still go first.
func (e *engine) startPrefetch() {
	e.prefetchOnce.Do(func() {
		e.fillStart.Store(max(1, e.now()))
		close(e.prefetchOn)
	})
}

// workerState is one filler's reusable state: nothing on the fill path
// allocates once it is warm.
type workerState struct {
	dec     *format.Decoder
	done    []waiter
	batch   []uint32
	rbuf    []byte
	scratch []byte // refills decode here first
	ubuf    []byte // buffered fills decode here first
	split   *splitJob
	vec     []byte // mincore
}

func (e *engine) worker() {
	defer e.workers.Done()
	w := &workerState{dec: e.r.NewDecoder()}
	defer w.dec.Close()
	raq := e.raq
	for {
		select {
		case u := <-e.faultq:
			e.fill(w, u, true)
			continue
		case r := <-e.splitq:
			e.helpSplit(w, r)
			continue
		case <-e.stop:
			return
		default:
		}
		select {
		case r := <-raq:
			e.readaheadFill(w, r)
			continue
		default:
		}
		select {
		case <-e.prefetchOn:
			if w.batch = e.claimPrefetch(w.batch[:0]); len(w.batch) > 0 {
				if w.rbuf == nil {
					w.rbuf = make([]byte, e.batchUnits()*e.unitSize)
				}
				e.fillBatch(w, w.batch)
				continue
			}
		default:
		}
		select {
		case u := <-e.faultq:
			e.fill(w, u, true)
		case r := <-e.splitq:
			e.helpSplit(w, r)
		case r := <-raq:
			e.readaheadFill(w, r)
		case <-e.stop:
			return
		case <-e.prefetchOnIfPending():
		case <-e.moreWork:
		}
	}
}

// Readahead: when a view's faults walk units in order, the engine fills the
// units ahead of them, in a window that starts at raInitBytes and doubles
// up to raMaxBytes each time the faults reach it, and stops when a fault
// breaks the pattern. Faults go first: a worker takes a readahead unit only
// when no fault is queued, one unit at a time, so a fault waits at most for
// the unit a worker is decoding (and with every worker on readahead, the
// faults' own units are the ones being decoded: measured, keeping a worker
// back for faults left it idle while the toucher waited on a readahead unit,
// 1.61x eager against 1.28x).
const (
	raInitBytes = 8 << 20
	raMaxBytes  = 64 << 20
)

func (e *engine) raInitUnits() int { return max(2, raInitBytes/e.unitSize) }
func (e *engine) raMaxUnits() int  { return max(4, raMaxBytes/e.unitSize) }

// raReq asks for unit u to be filled ahead of view v's faults, unless v's
// readahead generation has moved on from gen (the pattern broke).
type raReq struct {
	u   uint32
	gen uint32
	v   *View
}

// readaheadFill fills a unit asked for by readahead, if it is still wanted
// and absent. (One unit at a time, through the decoder's own read: reading
// several units' stored bytes at once, as prefetch does, measured no
// faster here, and its read buffer would be allocated on the fault path.)
func (e *engine) readaheadFill(w *workerState, r raReq) {
	if r.v.ra.gen.Load() != r.gen || r.v.dead.Load() {
		e.raMarker[r.u].CompareAndSwap(r.v, nil)
		return
	}
	if !e.state[r.u].CompareAndSwap(stAbsent, stFilling) {
		return
	}
	// In the fill journal like every other claim: a helper that dies
	// in the middle of this unit leaves it marked, and its successor
	// punches it instead of keeping half-written bytes.
	e.journalMark(r.u)
	e.c.readahead.Add(1)
	e.fill(w, r.u, false)
}

// prefetchBatchBytes is how much a worker claims from the prefetch order at
// once; the stored bytes of those units are read with as few preads as their
// layout in the file allows (adjacent chunks are read together).
const prefetchBatchBytes = 8 << 20

func (e *engine) batchUnits() int { return max(1, prefetchBatchBytes/e.unitSize) }

// claimPrefetch takes up to batchUnits units from the prefetch order and
// claims those still absent.
func (e *engine) claimPrefetch(out []uint32) []uint32 {
	for len(out) == 0 {
		next := e.prefetchNext.Load()
		limit := e.prefetchLimit.Load()
		if next >= limit {
			return out
		}
		k := min(int64(e.batchUnits()), limit-next)
		if !e.prefetchNext.CompareAndSwap(next, next+k) {
			continue
		}
		for _, u := range e.prefetchOrder[next : next+k] {
			if e.state[u].CompareAndSwap(stAbsent, stFilling) {
				e.journalMark(u)
				out = append(out, u)
			}
		}
	}
	return out
}

// extendPrefetch lets prefetch run through the whole order (the rest of the
// units after a working set) and wakes idle workers.
func (e *engine) extendPrefetch() {
	e.prefetchLimit.Store(int64(len(e.prefetchOrder)))
	select {
	case e.moreWork <- struct{}{}:
	default:
	}
	close1(e.moreWorkAll, &e.moreWorkOnce)
}

func close1(c chan struct{}, o *sync.Once) { o.Do(func() { close(c) }) }

// prefetchOnIfPending returns a channel that becomes ready when prefetch
// starts, or nil (never ready) when it has already started and run out.
func (e *engine) prefetchOnIfPending() <-chan struct{} {
	select {
	case <-e.prefetchOn:
		return nil
	default:
		return e.prefetchOn
	}
}

// unitChunks returns unit u's chunk range and whether decoding them writes
// every byte of the unit (no zero chunk, no short chunk, no tail).
func (e *engine) unitChunks(u uint32) (c0, c1 int, whole bool) {
	c0 = int(u) * e.chunksPerUnit
	c1 = min(c0+e.chunksPerUnit, e.r.NumChunks())
	whole = c1-c0 == e.chunksPerUnit
	for c := c0; c < c1 && whole; c++ {
		ch := e.r.Chunk(c)
		whole = ch.Codec != format.CodecZero && int(ch.RawLen) == e.chunkSize
	}
	return c0, c1, whole
}

// allocUnit allocates the (zeroed) pages of a unit that decoding does not
// write in full, so CONTINUE finds every page in the page cache.
func (e *engine) allocUnit(u uint32) error {
	if err := uffd.Fallocate(e.b.fd.Fd(), 0, int64(u)*int64(e.unitSize), int64(e.unitSize)); err != nil {
		return fmt.Errorf("restore: allocate unit %d: %w", u, err)
	}
	return nil
}

// buffered reports whether units are decoded into a worker's buffer and
// written into the backing with pwrite(2) rather than decoded straight into
// the alias mapping: on a backing of base pages (shmem), where a 2 MiB unit
// has 512 of them. Decoding into fresh alias pages costs a page fault per
// 4 KiB page and, in a VM with shadow page tables, a hypervisor exit on the
// first access of every newly mapped page (zstd reads back what it wrote):
// measured here at 4-10x the decode itself. pwrite allocates the pages and
// copies into them through the kernel's own mapping, no fault at all, and
// the worker's buffer stays warm. Hugetlbfs has no write(2); its units are
// one page anyway.
func (e *engine) buffered() bool {
	if h := e.hooks; h != nil && h.direct {
		return false
	}
	return e.b.pageSize < e.unitSize && !e.b.kind.hugetlb()
}

// unitBuf returns the worker's buffer for a buffered fill.
func (w *workerState) unitBuf(n int) []byte {
	if len(w.ubuf) < n {
		w.ubuf = make([]byte, n)
	}
	return w.ubuf[:n]
}

// writeUnit writes decoded unit u into the backing.
func (e *engine) writeUnit(u uint32, buf []byte) error {
	if err := e.writeRange(int64(u)*int64(e.unitSize), buf); err != nil {
		return fmt.Errorf("restore: write unit %d into the backing: %w", u, err)
	}
	return nil
}

// writeRange writes buf into the backing at off.
func (e *engine) writeRange(off int64, buf []byte) error {
	for len(buf) > 0 {
		n, err := unix.Pwrite(e.b.fd.Fd(), buf, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("pwrite at %#x: %w", off, err)
		}
		if n == 0 {
			return fmt.Errorf("pwrite at %#x: no progress", off)
		}
		buf, off = buf[n:], off+int64(n)
	}
	return nil
}

// fillUnit decodes unit u's chunks into the backing (straight into the
// alias mapping, or through the worker's buffer: see buffered) and makes
// sure every page of the unit is allocated. With split, a unit of several
// chunks is decoded by every idle worker at once (see splitDecode).
func (e *engine) fillUnit(w *workerState, u uint32, split bool) error {
	c0, c1, whole := e.unitChunks(u)
	buffered := e.buffered()
	base := int(u) * e.unitSize
	var dst []byte // the unit's bytes
	if buffered {
		dst = w.unitBuf(e.unitSize)
	} else {
		dst = e.alias.Bytes()[base : base+e.unitSize]
	}
	if split && c1-c0 > 1 && e.nWorkers > 1 && !e.noSplit() {
		if err := e.splitDecode(w, c0, c1, dst, buffered); err != nil {
			return err
		}
	} else {
		for c := c0; c < c1; c++ {
			k := c - c0
			if err := e.decodePart(w.dec, c, dst[k*e.chunkSize:(k+1)*e.chunkSize], buffered); err != nil {
				return err
			}
		}
	}
	if buffered {
		clear(dst[(c1-c0)*e.chunkSize:])
		return e.writeUnit(u, dst)
	}
	if !whole {
		return e.allocUnit(u)
	}
	return nil
}

// decodePart decodes chunk c into dst (chunkSize bytes). A buffered
// destination is not zero beforehand: what the chunk does not write is
// cleared.
func (e *engine) decodePart(dec *format.Decoder, c int, dst []byte, buffered bool) error {
	ch := e.r.Chunk(c)
	if ch.Codec == format.CodecZero {
		e.c.zeroChunks.Add(1)
		if buffered {
			clear(dst)
		}
		return nil
	}
	if err := dec.DecodeChunk(c, dst); err != nil {
		return err
	}
	if buffered {
		clear(dst[ch.RawLen:])
	}
	e.c.bytesDecoded.Add(int64(ch.RawLen))
	e.c.bytesRead.Add(int64(ch.StoredLen))
	return nil
}

func (e *engine) noSplit() bool { h := e.hooks; return h != nil && h.noSplit }

// A splitJob is one fault's unit being decoded chunk by chunk by its worker
// and every idle one (a first touch of a 2 MiB unit made of 256 KiB chunks
// waits for a fraction of one core's decode). Each worker owns one, reused
// for every fault it fills: nothing is allocated per fault. Helpers claim
// parts from state, a word holding the job's generation, its number of
// parts and the next part, so a helper that arrives after the job ended (or
// was reused for another unit) sees a different generation and claims
// nothing; the fields below state are read only under a claim, and the
// owner rewrites them only once every claimed part is done.
type splitJob struct {
	state    atomic.Uint64 // gen<<32 | parts<<16 | next part
	left     atomic.Int32  // parts not decoded yet
	done     chan struct{} // a helper that decodes the last part says so here
	c0       int
	dst      []byte
	buffered bool
	errMu    sync.Mutex
	err      error
}

type splitReq struct {
	j   *splitJob
	gen uint32
}

// splitDecode decodes chunks [c0, c1) into dst, offering the parts to idle
// workers and decoding what they do not take.
func (e *engine) splitDecode(w *workerState, c0, c1 int, dst []byte, buffered bool) error {
	j := w.split
	if j == nil {
		j = &splitJob{done: make(chan struct{}, 1)}
		w.split = j
	}
	n := c1 - c0
	gen := uint32(j.state.Load()>>32) + 1
	j.c0, j.dst, j.buffered, j.err = c0, dst, buffered, nil
	j.left.Store(int32(n))
	j.state.Store(uint64(gen)<<32 | uint64(n)<<16)
	for i := 0; i < min(n, e.nWorkers)-1; i++ {
		select {
		case e.splitq <- splitReq{j, gen}:
		default:
		}
	}
	if !e.runParts(w.dec, j, gen, false) {
		<-j.done // a helper is decoding the last part
	}
	j.dst = nil
	return j.err
}

// runParts decodes parts of job j (generation gen) until none is left to
// claim. It reports whether it decoded the job's last part.
func (e *engine) runParts(dec *format.Decoder, j *splitJob, gen uint32, helper bool) (last bool) {
	for {
		s := j.state.Load()
		next, parts := int(s&0xffff), int(s>>16&0xffff)
		if uint32(s>>32) != gen || next >= parts {
			return last
		}
		if !j.state.CompareAndSwap(s, s+1) {
			continue
		}
		cs := e.chunkSize
		if err := e.decodePart(dec, j.c0+next, j.dst[next*cs:(next+1)*cs], j.buffered); err != nil {
			j.errMu.Lock()
			if j.err == nil {
				j.err = err
			}
			j.errMu.Unlock()
		}
		if helper {
			e.c.splitParts.Add(1)
		}
		if j.left.Add(-1) == 0 {
			last = true
		}
	}
}

// helpSplit decodes parts of another worker's fault unit.
func (e *engine) helpSplit(w *workerState, r splitReq) {
	if e.runParts(w.dec, r.j, r.gen, true) {
		r.j.done <- struct{}{}
	}
}

// fillBatch fills claimed units (prefetch), reading the stored bytes of
// chunks that are adjacent in the file with one pread into rbuf.
func (e *engine) fillBatch(w *workerState, units []uint32) {
	if e.fetchSem != nil {
		e.fillBatchRemote(w, units)
		return
	}
	rbuf := w.rbuf
	var winOff uint64 // rbuf holds the file's bytes [winOff, winOff+winLen)
	winLen := 0
	for _, u := range units {
		if e.partial[u].Swap(false) {
			// Punched out by a target and claimed here before a fault
			// did: fill only the missing pages, like a fault would.
			e.publish(w, u, e.refillUnit(w, u), false)
			continue
		}
		e.fillStored(w, u, func(c int, ch format.Chunk) ([]byte, error) {
			if ch.Offset < winOff || ch.Offset+uint64(ch.StoredLen) > winOff+uint64(winLen) {
				var err error
				if winOff, winLen, err = e.readAhead(units, u, c, rbuf); err != nil {
					return nil, err
				}
			}
			lo := int(ch.Offset - winOff)
			return rbuf[lo : lo+int(ch.StoredLen)], nil
		})
	}
}

// fillStored fills claimed unit u (prefetch) by decoding each of its stored
// chunks from the bytes stored(c, chunk) gives, publishes it, and then
// serves the faults that arrived meanwhile.
func (e *engine) fillStored(w *workerState, u uint32, stored func(c int, ch format.Chunk) ([]byte, error)) {
	mem := e.alias.Bytes()
	c0, c1, whole := e.unitChunks(u)
	buffered := e.buffered()
	var ubuf []byte
	if buffered {
		ubuf = w.unitBuf(e.unitSize)
	}
	base := int(u) * e.unitSize
	var err error
	for c := c0; c < c1 && err == nil; c++ {
		ch := e.r.Chunk(c)
		off := c * e.chunkSize
		dst := mem[off : off+e.chunkSize]
		if buffered {
			dst = ubuf[off-base : off-base+e.chunkSize]
		}
		if ch.Codec == format.CodecZero {
			e.c.zeroChunks.Add(1)
			if buffered {
				clear(dst)
			}
			continue
		}
		var src []byte
		if src, err = stored(c, ch); err != nil {
			break
		}
		if err = w.dec.DecodeStored(c, src, dst); err == nil {
			e.c.bytesDecoded.Add(int64(ch.RawLen))
			if buffered {
				clear(dst[ch.RawLen:])
			}
		}
	}
	switch {
	case err != nil:
	case buffered:
		clear(ubuf[(c1-c0)*e.chunkSize:])
		err = e.writeUnit(u, ubuf)
	case !whole:
		err = e.allocUnit(u)
	}
	e.publish(w, u, err, false)
	// Faults jump the queue: serve any that arrived during this unit
	// before the next one.
	for drained := false; !drained; {
		select {
		case fu := <-e.faultq:
			e.fill(w, fu, true)
		case r := <-e.splitq:
			e.helpSplit(w, r)
		default:
			drained = true
		}
	}
}

// readAhead reads, from chunk c of unit u on, the stored bytes of the run of
// chunks of units (from u on) that lie back to back in the file, as many as
// fit in rbuf.
func (e *engine) readAhead(units []uint32, u uint32, c int, rbuf []byte) (uint64, int, error) {
	start := e.r.Chunk(c)
	end := start.Offset + uint64(start.StoredLen)
	if int(start.StoredLen) > len(rbuf) {
		return 0, 0, fmt.Errorf("restore: chunk %d: stored length %d exceeds the read buffer", c, start.StoredLen)
	}
	i := 0
	for i < len(units) && units[i] != u {
		i++
	}
	next := c + 1
extend:
	for ; i < len(units); i++ {
		c0, c1, _ := e.unitChunks(units[i])
		if units[i] != u {
			next = c0
		}
		for ; next < c1; next++ {
			ch := e.r.Chunk(next)
			if ch.Codec == format.CodecZero {
				continue
			}
			if ch.Offset != end || end+uint64(ch.StoredLen)-start.Offset > uint64(len(rbuf)) {
				break extend
			}
			end += uint64(ch.StoredLen)
		}
	}
	n := int(end - start.Offset)
	if err := e.r.ReadStored(rbuf[:n], int64(start.Offset)); err != nil {
		return 0, 0, fmt.Errorf("restore: read chunks at %#x: %w", start.Offset, err)
	}
	e.c.bytesRead.Add(int64(n))
	e.c.reads.Add(1)
	return start.Offset, n, nil
}

// fill fills unit u (already claimed: state filling), publishes it and
// resolves every fault waiting on it. done is a reusable scratch slice.
func (e *engine) fill(w *workerState, u uint32, byFault bool) {
	var err error
	// The first fault's own fill (a fault on a unit another path fills
	// leaves the trace without one: see firstByteTrace).
	first := byFault && e.firstFaultUnit.Load() == int64(u)+1 && e.firstFillAt.Load() == 0 &&
		e.firstFillAt.CompareAndSwap(0, time.Now().UnixNano())
	if e.partial[u].Swap(false) {
		err = e.refillUnit(w, u)
	} else {
		err = e.fillUnit(w, u, byFault)
	}
	if first {
		e.firstFilledAt.Store(time.Now().UnixNano())
	}
	e.publish(w, u, err, byFault)
}

// refillUnit fills the pages of unit u that are missing from the page cache
// (a target punched them out) and leaves the others alone: in a shared view
// they may hold the target's writes. The unit is decoded into scratch first.
func (e *engine) refillUnit(w *workerState, u uint32) error {
	if w.scratch == nil {
		w.scratch = make([]byte, e.unitSize)
		w.vec = make([]byte, e.unitSize/os.Getpagesize()) // mincore: a byte per base page
	}
	c0, c1, _ := e.unitChunks(u)
	for c := c0; c < c1; c++ {
		dst := w.scratch[(c-c0)*e.chunkSize : (c-c0+1)*e.chunkSize]
		if err := w.dec.DecodeChunk(c, dst); err != nil {
			return err
		}
		clear(dst[e.r.Chunk(c).RawLen:])
	}
	clear(w.scratch[(c1-c0)*e.chunkSize:])
	start := int(u) * e.unitSize
	if err := e.alias.Resident(start, e.unitSize, w.vec); err != nil {
		return fmt.Errorf("restore: refill unit %d: %w", u, err)
	}
	mem := e.alias.Bytes()[start : start+e.unitSize]
	ps := e.b.pageSize
	perPage := ps / os.Getpagesize()
	buffered := e.buffered()
	for i := 0; i < e.unitSize/ps; i++ {
		if w.vec[i*perPage]&1 != 0 {
			continue
		}
		if !buffered {
			copy(mem[i*ps:(i+1)*ps], w.scratch[i*ps:(i+1)*ps])
			continue
		}
		// A run of missing pages in one write, no fault per page.
		j := i + 1
		for j < e.unitSize/ps && w.vec[j*perPage]&1 == 0 {
			j++
		}
		if err := e.writeRange(int64(start+i*ps), w.scratch[i*ps:j*ps]); err != nil {
			return fmt.Errorf("restore: refill unit %d: %w", u, err)
		}
		i = j
	}
	e.c.bytesDecoded.Add(int64(e.unitSize))
	return nil
}

// publish marks unit u present (or poisoned, after err) and answers its
// waiters.
func (e *engine) publish(w *workerState, u uint32, err error, byFault bool) {
	done := w.done
	final := stPresent
	if err != nil {
		final = stPoisoned
		err = fmt.Errorf("restore: unit %d (offset %#x): %w", u, int64(u)*int64(e.unitSize), err)
		// Never leave unverified bytes in the page cache.
		if perr := e.punch(u); perr != nil {
			// Overwrite them instead: a page that stays is zeros, never
			// half-decoded bytes (no view maps a poisoned unit anyway).
			clear(e.alias.Bytes()[int64(u)*int64(e.unitSize) : int64(u+1)*int64(e.unitSize)])
			err = fmt.Errorf("%w; punching it out of the backing failed too (%v): its bytes were cleared instead", err, perr)
		}
		e.setErr(err)
		e.errMu.Lock()
		e.unitErr[u] = err
		e.errMu.Unlock()
		e.c.poisoned.Add(1)
	} else if byFault {
		e.c.filledByFault.Add(1)
		if e.ws != nil {
			if e.ws.inSet[u] {
				e.c.wsLate.Add(1)
			} else {
				e.c.wsMissed.Add(1)
			}
		}
	} else {
		e.c.filledByPrefill.Add(1)
		if e.ws != nil && e.ws.inSet[u] {
			e.c.wsPrefilled.Add(1)
		}
	}
	e.journalDone(u)
	sh := &e.shards[u%uint32(len(e.shards))]
	sh.mu.Lock()
	e.state[u].Store(final)
	done = done[:0]
	keep := sh.w[:0]
	for _, w := range sh.w {
		if w.unit == u {
			done = append(done, w)
		} else {
			keep = append(keep, w)
		}
	}
	clear(sh.w[len(keep):])
	sh.w = keep
	sh.mu.Unlock()
	last := e.present.Add(1) == int64(e.nUnits)
	for _, w := range done {
		e.answer(w.v, u, w.addr, w.t0, final)
	}
	// A readahead marker is left unmapped in its view: the fault on it
	// tells the view's readahead that the faults have reached the window.
	marker := e.raMarker[u].Swap(nil)
	if final == stPresent && e.cfg.premap {
		e.premap(u, done, marker)
	}
	if last {
		if st := e.fillStart.Load(); st != 0 {
			e.fillTime.Store(e.now() - st)
		}
		e.allOnce.Do(func() { close(e.allPresent) })
	}
	clear(done)
	w.done = done[:0]
}

// premap maps unit u into every view that has not just been answered (nor
// skip), so their first touch costs no fault at all.
func (e *engine) premap(u uint32, answered []waiter, skip *View) {
	e.viewsMu.RLock()
	defer e.viewsMu.RUnlock()
next:
	for _, v := range e.views {
		for _, w := range answered {
			if w.v == v {
				continue next
			}
		}
		if v.dead.Load() || v == skip {
			continue
		}
		v.continueUnit(u, 0)
		e.c.premapped.Add(1)
	}
}

// request handles a fault of view v at addr on unit u.
func (e *engine) request(v *View, u uint32, addr uintptr, t0 int64) {
	switch st := e.state[u].Load(); st {
	case stPresent, stPoisoned:
		e.answer(v, u, addr, t0, st)
		return
	}
	sh := &e.shards[u%uint32(len(e.shards))]
	sh.mu.Lock()
	st := e.state[u].Load()
	if st == stPresent || st == stPoisoned {
		sh.mu.Unlock()
		e.answer(v, u, addr, t0, st)
		return
	}
	sh.w = append(sh.w, waiter{unit: u, v: v, addr: addr, t0: t0})
	claimed := st == stAbsent && e.state[u].CompareAndSwap(stAbsent, stFilling)
	sh.mu.Unlock()
	if claimed {
		e.journalMark(u)
		e.faultq <- u
	} else {
		v.c.faultsWaited.Add(1)
	}
}

// answer resolves a fault on a unit that is present (CONTINUE) or poisoned
// (POISON: the toucher gets SIGBUS, never wrong bytes). A fault that cannot
// be resolved either way ends the view with the error (View.fail): it is
// never dropped in silence.
func (e *engine) answer(v *View, u uint32, addr uintptr, t0 int64, st uint32) {
	var err error
	if e.firstFault.Load() == 0 && st != stPoisoned {
		// Before the CONTINUE that wakes the faulting thread: a Stats
		// call it makes next sees it. (A CONTINUE that fails and is
		// answered again later leaves it a little early.)
		e.firstFault.CompareAndSwap(0, time.Now().UnixNano())
	}
	if st == stPoisoned {
		err = v.poison(u, addr)
	} else if err = v.continueUnit(u, addr); errors.Is(err, errRefill) {
		e.refill(v, u, addr, t0)
		return
	}
	if errors.Is(err, errRetry) {
		v.deferFault(u, addr, t0)
		return
	}
	if err != nil {
		if !errors.Is(err, errGone) && !v.dead.Load() {
			v.fail(err)
		}
		return
	}
	v.c.latency.record(time.Duration(e.now() - t0))
}

var (
	errRefill = errors.New("restore: page missing from the page cache")
	errRetry  = errors.New("restore: address space changing (EAGAIN): answer again after the pending event")
	errGone   = errors.New("restore: the view's address space is gone")
)

// refill handles a unit whose pages were punched out of the backing (a
// target's MADV_REMOVE or fallocate(PUNCH_HOLE)): it goes back to absent and
// is filled again, so the toucher sees the snapshot's bytes, never zeros.
func (e *engine) refill(v *View, u uint32, addr uintptr, t0 int64) {
	// partial first: a fault that claims the unit as soon as it is absent
	// must refill only the missing pages, never decode over the others (a
	// shared target's writes). A stale true is harmless: every later fill
	// of a unit that was present once is a refill.
	e.partial[u].Store(true)
	if e.state[u].CompareAndSwap(stPresent, stAbsent) {
		if h := e.hooks; h != nil && h.refillAbsent != nil {
			h.refillAbsent(u)
		}
		e.present.Add(-1)
		e.c.refills.Add(1)
	}
	e.request(v, u, addr, t0)
}

// punch removes unit u from the backing's page cache.
func (e *engine) punch(u uint32) error {
	off, n := int64(u)*int64(e.unitSize), int64(e.unitSize)
	if h := e.hooks; h != nil && h.punch != nil {
		return h.punch(u)
	}
	return uffd.Fallocate(e.b.fd.Fd(), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// unitError is why unit u was poisoned.
func (e *engine) unitError(u uint32) error {
	e.errMu.Lock()
	defer e.errMu.Unlock()
	if err := e.unitErr[u]; err != nil {
		return err
	}
	return fmt.Errorf("restore: unit %d failed", u)
}

// DisablePoisonEnv, set to 1, makes the engine answer faults on units that
// failed to fill as on a kernel without UFFDIO_POISON (before Linux 6.6):
// by ending the view. For testing that path on newer kernels.
const DisablePoisonEnv = "UFFDRESTORE_DISABLE_POISON"

// poisonAvailable reports whether faults on a failed unit can be answered
// with UFFDIO_POISON.
func poisonAvailable() bool {
	if os.Getenv(DisablePoisonEnv) == "1" {
		return false
	}
	poisonProbe.Do(func() {
		// When the probe itself fails, try the ioctl: its failure ends
		// the view too.
		have, _, err := uffd.Supported(uffd.OpenOptions{})
		poisonOK = err != nil || have&uffd.FeaturePoison != 0
	})
	return poisonOK
}

var (
	poisonProbe sync.Once
	poisonOK    bool
)

// engineHooks let tests widen race windows and inject failures.
type engineHooks struct {
	refillAbsent func(u uint32)       // in refill, right after it made u absent
	punch        func(u uint32) error // replaces the punch of a failed unit
	direct       bool                 // decode shmem units straight into the alias (the old way)
	noReadahead  bool                 // no readahead
	noSplit      bool                 // a fault\'s unit is decoded by its worker alone
}

func (e *engine) addView(v *View) {
	e.viewsMu.Lock()
	e.views = append(e.views, v)
	e.viewsMu.Unlock()
}

func (e *engine) removeView(v *View) {
	e.viewsMu.Lock()
	for i, x := range e.views {
		if x == v {
			e.views = append(e.views[:i], e.views[i+1:]...)
			break
		}
	}
	e.viewsMu.Unlock()
	// Drop its waiters.
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.Lock()
		keep := sh.w[:0]
		for _, w := range sh.w {
			if w.v != v {
				keep = append(keep, w)
			}
		}
		clear(sh.w[len(keep):])
		sh.w = keep
		sh.mu.Unlock()
	}
	e.retired.add(&v.c)
}

func (e *engine) stats() Stats {
	s := Stats{Mode: e.cfg.mode.String(), Backing: e.b.kind.String(), Chunks: e.r.NumChunks(), Units: e.nUnits}
	var total counters
	total.add(&e.c)
	total.add(&e.retired)
	e.viewsMu.RLock()
	s.Views = len(e.views)
	for _, v := range e.views {
		total.add(&v.c)
	}
	e.viewsMu.RUnlock()
	total.fill(&s)
	s.UnitsPresent = e.present.Load()
	s.FillTime = time.Duration(e.fillTime.Load())
	if t := e.firstFault.Load(); t != 0 {
		s.FirstFaultAt = time.Unix(0, t)
	}
	s.FirstByteMarks = []int64{e.createdAt.Load(), e.servingAt.Load(), e.firstReadAt.Load(),
		e.firstFillAt.Load(), e.firstFilledAt.Load(), e.firstFault.Load()}
	if e.ws != nil {
		s.WorkingSet = &WorkingSetStats{Profile: e.ws.name, Units: e.ws.units, Prefilled: total.wsPrefilled.Load(),
			Late: total.wsLate.Load(), Missed: total.wsMissed.Load()}
	}
	if err := e.err(); err != nil {
		s.LastError = err.Error()
	}
	return s
}

// close stops the workers and unmaps the alias. Views must be closed first.
func (e *engine) close() {
	close(e.stop)
	e.workers.Wait()
	if e.alias != nil {
		e.alias.Close()
	}
	e.journal.close()
}

func (c *counters) add(o *counters) {
	c.faultsMinor.Add(o.faultsMinor.Load())
	c.faultsMissing.Add(o.faultsMissing.Load())
	c.faultsWaited.Add(o.faultsWaited.Load())
	c.filledByFault.Add(o.filledByFault.Load())
	c.filledByPrefill.Add(o.filledByPrefill.Load())
	c.refills.Add(o.refills.Load())
	c.zeroChunks.Add(o.zeroChunks.Load())
	c.bytesDecoded.Add(o.bytesDecoded.Load())
	c.bytesRead.Add(o.bytesRead.Load())
	c.continues.Add(o.continues.Load())
	c.premapped.Add(o.premapped.Load())
	c.poisoned.Add(o.poisoned.Load())
	c.errors.Add(o.errors.Load())
	c.reads.Add(o.reads.Load())
	c.readahead.Add(o.readahead.Load())
	c.splitParts.Add(o.splitParts.Load())
	c.wsPrefilled.Add(o.wsPrefilled.Load())
	c.wsLate.Add(o.wsLate.Load())
	c.wsMissed.Add(o.wsMissed.Load())
	c.latency.merge(&o.latency)
}
