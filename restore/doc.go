// Package restore loads uffdrestore snapshots into memory and fills pages
// lazily with userfaultfd minor faults.
//
// # Layout
//
// This package is the public API and only that: its types are aliases of
// those of restore/internal/engine, which does the work, in the order of
// the data path:
//
//	snapshot file → format.Reader → fillers → alias → UFFDIO_CONTINUE → view
//	format/         (index, CRCs)   engine.go  backing.go  restore/uffd   view.go
//
// restore/attach (the attach protocol, PROTOCOL.md: its server serves a
// Loader's views to other processes) and restore/helper (the helper
// process below: a Loader and an attach server) use the engine directly;
// restore/uffd is the one gateway to the kernel.
//
// # Data path
//
// A snapshot is loaded into a backing file: a hugetlb memfd, a file in a
// hugetlbfs mount, or a shmem memfd (auto picks hugetlb when the pool has
// room for the whole snapshot, else shmem). The restorer maps the backing
// once as its alias; views of the same file — in this process or in attached
// targets — are registered with userfaultfd in MISSING|MINOR mode. On a
// fault, a filler decompresses the unit's chunks straight into the alias (no
// bounce buffer, no UFFDIO_COPY) and the fault is resolved with
// UFFDIO_CONTINUE, which only installs page-table entries. Because the page
// cache is shared, every view restores from one fill.
//
// A unit is max(chunk size, page size): one CONTINUE covers whole pages, and a
// 64 KiB-chunk snapshot on 2 MiB pages fills a page's 32 chunks together.
// Each unit has an atomic state (absent → filling → present, or poisoned).
// Faults on absent units go to a queue the fillers serve before any
// prefetch; a fault on a filling unit waits on it (no second fill); a fault
// on a present unit is one CONTINUE. Zero chunks are never decompressed:
// their pages are allocated zeroed with fallocate.
//
// On a shmem backing (4 KiB pages) a unit is decoded into the filler's own
// warm buffer and written into the memfd with pwrite(2) instead: decoding
// into the alias took a page fault per 4 KiB page and, in a VM with shadow
// page tables, an exit on the first access to every newly mapped page, which
// made a 2 MiB shmem fault 4-10x a hugetlb one (perf: exc_page_fault under
// the decoder, and the decoder itself 2x slower than into a warm buffer).
// pwrite allocates the pages and copies through the kernel's mapping, with
// no fault (TestShmemFillTakesNoPageFaults counts them).
//
// Readahead. When a view's faults walk units in order (three in a row),
// the units after them are filled by idle workers in a window that starts
// at 8 MiB and doubles to 64 MiB each time the faults reach it; the
// window's first unit is left unmapped in that view so its fault says the
// walk goes on. A fault anywhere else ends it and drops what was queued.
// Faults go first: a worker takes a readahead unit only when no fault is
// queued (Stats.Readahead counts the units it filled).
//
// Split first touch. A fault on an absent unit of several chunks (256 KiB
// chunks on 2 MiB pages) offers the unit's chunks to the idle workers: they
// and the fault's worker decode them at once (Stats.SplitParts counts the
// chunks the helpers took). A 2 MiB chunk cannot be split.
//
// # Choices, and the measurements behind them (2 vCPU VM, kernel 6.18)
//
// The benchmarks named here are the engine's: go test -run '^$' -bench
// NAME ./restore/internal/engine/.
//
// MISSING|MINOR, no pre-allocation. Registering MINOR alone needs every page
// in the page cache before the first touch (fallocate of 4 GiB: 0.25–0.46 s),
// which makes time to ready grow with the snapshot. With MISSING as well, a
// never-touched page raises a missing fault, the filler's write into the
// alias allocates it, and CONTINUE maps it. Lazy Open measured 0.879 ms for
// 256 MiB against 0.888 ms for 4 GiB side by side (`uffdrestore bench
// --check-targets`, 15 interleaved runs each, medians on a 2-vCPU VM): flat
// in size. Its index is parsed where it lies (no copy of the chunk table)
// into a buffer kept from one Open to the next, and the helper's fork and
// exec are not waited for (below).
//
// Huge pages are reserved, not allocated, up front: the alias is a
// MAP_SHARED hugetlb mapping, which reserves the whole file's pages at mmap
// time, so a short pool fails with ErrNoHugePages and the fix before anything
// is mapped, never with a SIGBUS later.
//
// Premap. A unit filled without a fault (eager, prefetch, another view's
// fault) is CONTINUEd into every view at once, and a view that attaches
// later gets every present unit mapped at attach, so its first touch costs
// no fault at all (BenchmarkSecondViewPremapped: 0 faults; touch p50
// 7.3 µs, p99 82 µs on a VM whose first touch of a 4 KiB page mapping costs
// 6–7 µs, 0.03 / 0.53 µs on an earlier VM of the same kind where it was
// cheap); with premap off (WithPremap(false)) a touch of a present unit
// costs one CONTINUE round trip: p50 29–35 µs, p99 150–260 µs on the first
// VM, 10–14 / 75–200 µs on the second (BenchmarkFaultLatency,
// present-p50/p99, quiet machine).
//
// First-touch latency of an absent 2 MiB unit was 0.93–1.18x the ideal
// measured in the same run (decoding that chunk into a warm buffer plus
// allocating and zeroing one huge page; BenchmarkFaultLatency first/ideal):
// s2 1.86 ms against 1.87 ms, zstd 2.04 ms against 1.74 ms. The fault round trip is small next to a 2 MiB
// decode; what is left is mostly decoding into cold memory.
//
// No spinning. A fault loop waits as soon as the uffd is empty, parked in
// Go's network poller (not in poll(2): a goroutine blocked in a system call
// keeps a P in that call, which the runtime's monitor thread takes back
// every 20 µs, and so wakes at that rate; on two vCPUs each of its wakeups
// preempted a filler: about 10,000 context switches in a 1 GiB sequential
// lazy restore, whose fills ran 40% slower than with no toucher; parked in
// the poller, lazy sequential went from 1.5x eager to 1.02-1.13x).
// Busy-polling 50 µs, or even 1 ms, after each batch left the present-unit
// p50 about where it was (29–32 µs against 34–35 µs) and did not lower the
// p99 (176–256 µs against 151–218 µs): the cost is waking
// the faulting thread's vCPU, which the handler cannot speed up, and on two
// vCPUs a spinning handler takes a core from the fillers. WithSpin sets a
// spin for machines where it pays.
//
// Eager throughput (BenchmarkEager, memory-like content, zstd, 2 MiB
// chunks, 3 runs, idle machine): 846 MB/s with one worker, 1737 MB/s with
// two (2.05x), against 771 MB/s for `zstd -d -T0` into tmpfs and reading the
// file back (BenchmarkBaselineZstdCLI): 2.25x faster. The restorer's own
// memory for an eager fill of a 256 MiB snapshot peaked at 6.3 MiB of
// anonymous RSS (BenchmarkLoaderRSS; 9–11 MiB for 4 GiB in an earlier run):
// one decoder and read buffer per worker.
//
// # The in-process trap, and the helper process
//
// A page fault is not a system call: a goroutine that touches an unfilled
// page blocks its thread while keeping its P, and a Go fault handler in the
// same process needs a P to run. With GOMAXPROCS=1 that deadlocks; with more
// Ps it deadlocks as soon as the runtime stops the world (a GC) while a
// goroutine is blocked in a fault inside non-preemptible code such as
// memmove. So Open serves faults from a helper process: this program
// re-executed (/proc/self/exe, or WithHelper) as "uffdrestore-helper",
// running a Loader on the backing Open created, served by an attach server
// (restore/attach, the protocol of PROTOCOL.md) on one end of a socketpair.
// Open is the attach client on the other end: it starts the helper process
// first, creates the backing, maps and registers the view, and puts the
// helper's job (its configuration, the snapshot and the backing) and the
// attach with the view's userfaultfd in the helper's socket, then returns:
// the first fault waits for the helper to come up, and nothing in this
// process is needed to serve it. Open does not wait for the helper's fork
// and exec either: they run on a C thread of their own (posix_spawn
// returns only after the child's exec, which on a 2-vCPU VM took 0.5-3.5 ms
// from one Open to the next, more than the rest of Open), which needs no P
// of this process. What can be checked without running the helper (that
// its file exists and is executable) fails Open at once; a fork or exec
// that fails later (too many processes, not a program) ends the helper's
// session, and once the respawns are spent the restore's requests (Wait,
// Stats) return ErrHelperDied with that cause.
//
// First byte. What a user waits for the first byte of a lazy restore is
// Open plus the helper's start plus the first unit's fill
// (Stats.TimeToFirstByte; `uffdrestore bench` reports it from the start of
// Open). On a 2-vCPU VM a process start alone costs milliseconds (fork,
// exec and exit of a C program: 3+ ms; of a Go program: 7+ ms), so a cold
// first byte costs about 22 ms there. PrestartHelper starts a helper ahead
// and keeps one ready for the next Open (which takes it and starts the
// next one in the background): a program that restores again and again,
// or that can call it before it knows what to restore, waits for no
// process start. Measured (256 MiB, 2 MiB chunks, hugetlb memfd, load
// 1.6-1.8, 3 interleaved rounds of 15 Opens, p50): cold 21.7-22.7 ms
// (21.8-21.9 before the helper started at Open's beginning: no gain on 2
// vCPUs), prestarted 11.2-12.1 ms. A prestarted helper warms, while it
// waits, what its first fault uses: the JSON codecs of its job, zstd
// decoders that have each decoded a chunk-sized frame, and stored-bytes
// buffers written once by the kernel and once from user space
// (format.Prewarm); its fill journal is a memfd Open hands it. Interleaved
// against the code before that (15 prestarted Opens of 256 MiB per round,
// p50 per round): 8.5-10.2 ms before, 6.0-8.3 ms after. What is left is
// Open (about 1 ms), the helper's Loader and handshake (about 2.5 ms) and
// the first unit's fill (about 2.2 ms, nearly all of it the single-core
// decode of the 2 MiB frame). A helper started by its Open does not warm
// up (its job is already waiting: the same work only competed with the
// restore, 22 -> 30 ms). Serving the first faults in this process until
// the helper is up was measured against and rejected: handing over needs
// this process to stop filling, which needs a P that a goroutine blocked
// in a fault may hold (the trap above), so a fill that stalled could land
// after the helper took over and overwrite what the program wrote. Stats,
// Wait and Profile wait for the
// protocol's ready first. Any goroutine, with any GOMAXPROCS, may then touch
// the view. Errors keep their kind across the process boundary (the error
// message's "code"): Wait's error for a corrupt chunk matches
// format.ErrChecksum with errors.Is, as Loader.Wait's does. If the helper
// process dies (its socket closes before Close: killed, OOM), Open's side
// starts a new one on the same backing and userfaultfd, which adopts the
// backing as AdoptLoader does (units present are kept, never refilled: the
// program may have written them; units the dead helper was filling, per
// the fill journal that Open keeps in a memfd and hands each helper, are
// punched and filled again) and re-attaches the view, waking every thread
// waiting in it; Wait and Stats carry on with it (Stats.HelperRespawns counts them). After
// MaxHelperRespawns, or when a new helper cannot be started, Wait, Stats and
// Profile return ErrHelperDied and threads touching unfilled pages stay
// blocked (nothing else can serve them without wrong bytes): Close the
// restore. Replacing a helper needs a P of this process that no goroutine
// blocked in a fault holds (see ErrHelperDied): give GOMAXPROCS at least 2. A helper that breaks the protocol or refuses is not replaced:
// faults on unfilled pages block rather than read zeros, and Stats and Wait
// return why (restore/helper.ErrHelper).
// Eager mode needs no helper: everything is decompressed before Open
// returns.
//
// # What an embedding program must do
//
// A program that calls Open in ModeLazy, ModePrefetch or ModeWorkingSet
// imports restore/helper for its side effect in its main package:
//
//	import _ "github.com/uffdrestore/uffdrestore/restore/helper"
//
// Its init runs the helper (and exits) when the process was started as one,
// and does nothing else otherwise; the program's main never runs in a
// helper. Without the import such an Open fails at once with ErrNoHelper.
// Importing restore alone never changes what a program does: it has no
// init that takes the process over. Test binaries of packages that Open
// lazily import it too (in a _test.go file). A program that cannot be
// re-executed (or should not be) names another executable that imports
// restore/helper with WithHelper, or uses ModeEager.
//
// GOMAXPROCS. A fault loop is a goroutine parked in the network poller
// without a P; when a fault wakes it, it needs a P again, and if the
// fillers hold every P (a 2 MiB decode has no preemption point; Go preempts
// it after 10 ms) the fault waits. The helper process and `uffdrestore load`
// therefore run with one P more than they have fillers. A trace of the
// helper in a working-set restore (UFFDRESTORE_HELPER_TRACE=FILE writes one)
// showed 260 ms of runnable-without-a-P time in a 320 ms restore before, and
// the restore took 163 ms after. A program that embeds a Loader should leave
// the same headroom: WithWorkers(runtime.GOMAXPROCS(0) - 1).
//
// A Loader (the server side) serves views that other processes registered;
// their faulting threads are theirs, so the Loader's fault loops never wait
// on them.
//
// # Errors
//
// A chunk that fails its checksum during a lazy fill is punched out of the
// page cache and the unit is poisoned with UFFDIO_POISON: the thread that
// touches it gets SIGBUS, never wrong bytes; the error is in Stats.LastError
// and returned by Wait. Without UFFDIO_POISON (Linux < 6.6, or
// UFFDRESTORE_DISABLE_POISON=1 to test that path) the fault cannot be
// answered: the view ends with the error (an attached target's session
// ends with it, see PROTOCOL.md §3.4) and the faulting thread stays
// blocked; it never reads the unit's bytes. Any other fault that cannot be
// resolved (a UFFDIO_CONTINUE failing with an unexpected errno, faults
// outside every range of the view that no event explains) ends the view the
// same way: a fault is never dropped in silence. A unit whose pages were
// punched out by a target
// (MADV_REMOVE, fallocate(PUNCH_HOLE)) is filled again when touched.
package restore
