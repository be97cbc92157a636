package engine

import (
	"fmt"
	"os"
	"time"

	"github.com/uffdrestore/uffdrestore/remote"
)

// Mode says when chunks are filled.
type Mode int

// Restore modes.
const (
	// ModeLazy fills a unit only when a view faults on it: the fastest time
	// to ready, and the least work for sparse access.
	ModeLazy Mode = iota
	// ModeEager fills every unit in parallel before the restore is ready:
	// no fault costs afterwards.
	ModeEager
	// ModePrefetch is lazy plus idle workers filling the rest in file
	// order; faults jump the queue.
	ModePrefetch
	// ModeWorkingSet is lazy plus a recorded working set (WithProfile)
	// filled first, in recorded order; faults still jump the queue. With
	// WithPrefetchRest the rest follows.
	ModeWorkingSet
)

func (m Mode) String() string {
	switch m {
	case ModeEager:
		return "eager"
	case ModePrefetch:
		return "prefetch"
	case ModeWorkingSet:
		return "working-set"
	}
	return "lazy"
}

// ParseMode parses lazy (or the empty string), eager, prefetch and
// working-set (or workingset, ws).
func ParseMode(s string) (Mode, error) {
	switch s {
	case "", "lazy":
		return ModeLazy, nil
	case "eager":
		return ModeEager, nil
	case "prefetch":
		return ModePrefetch, nil
	case "working-set", "workingset", "ws":
		return ModeWorkingSet, nil
	}
	return 0, fmt.Errorf("restore: unknown mode %q (want lazy, eager, prefetch or working-set)", s)
}

type config struct {
	mode         Mode
	backing      BackingKind
	hugetlbfsDir string
	workers      int
	spin         time.Duration
	premap       bool
	helperPath   string
	record       string
	profile      ProfileSource
	prefetchRest bool
	forTargets   bool
	remote       remote.Options // for a snapshot given as an http(s) URL
	// fetchParallel: the snapshot is remote and reads this many ranges at
	// once (set by the open path, not an option); 0 for a local file.
	fetchParallel int
	adopt         *AdoptInfo // AdoptLoader: learn the units present, fill in the numbers
	journal       string     // WithFillJournal
	journalFile   *os.File   // a helper's: the journal its Open keeps (a memfd), mapped, not kept
}

func defaultConfig() config {
	return config{mode: ModeLazy, backing: BackingAuto, spin: DefaultSpin, premap: true}
}

// DefaultSpin is how long a fault loop busy-polls for the next fault before
// it waits in the poller: none. Measured here (BenchmarkFaultLatency, a present
// unit's fault in a second view), spinning 50 µs or even 1 ms left the p50
// (11–14 µs) unchanged and did not lower the p99: what a fault costs is
// mostly waking the faulting thread, not the handler; and on two vCPUs a
// spinning handler takes a core from the fillers. See the package
// documentation.
const DefaultSpin = 0

// Option configures a restore.
type Option func(*config)

// WithRemote sets how a snapshot given as an http:// or https:// URL is
// read (parallel requests, timeouts, retries, headers; see package remote).
// Its Client is not used by the fault-handler helper of Open, which makes
// its own.
func WithRemote(o remote.Options) Option { return func(c *config) { c.remote = o } }

// WithMode sets the mode (default lazy).
func WithMode(m Mode) Option { return func(c *config) { c.mode = m } }

// WithBacking sets the backing kind (default auto).
func WithBacking(k BackingKind) Option { return func(c *config) { c.backing = k } }

// ForTargets says a Loader serves targets that map each region on its own
// (the attach protocol's clients do): every non-empty region must then
// start on a page boundary of the backing. A snapshot whose chunks are
// smaller than a huge page (--chunk-size 64K, usual for --from-pid) does
// not guarantee that for huge pages: auto then picks shmem, and an explicit
// huge-page backing is refused with that fix.
func ForTargets() Option { return func(c *config) { c.forTargets = true } }

// WithHugetlbfsDir sets the hugetlbfs mount for BackingHugetlbfs.
func WithHugetlbfsDir(dir string) Option {
	return func(c *config) {
		c.hugetlbfsDir = dir
		if c.backing == BackingAuto {
			c.backing = BackingHugetlbfs
		}
	}
}

// WithWorkers sets the number of filler goroutines (default: the number of
// CPUs).
func WithWorkers(n int) Option { return func(c *config) { c.workers = n } }

// WithSpin sets how long a fault loop busy-polls before sleeping (0: never
// spin).
func WithSpin(d time.Duration) Option { return func(c *config) { c.spin = d } }

// WithPremap sets whether units filled ahead of a fault (eager, prefetch, or
// another view's fault) are mapped into every view at once, so a later touch
// costs no fault (default true).
func WithPremap(on bool) Option { return func(c *config) { c.premap = on } }

// WithHelper sets the executable that runs the fault handler of an
// in-process restore (default: this program itself, /proc/self/exe). It
// must import restore/helper (see the package documentation); it is run
// with argv[0] "uffdrestore-helper".
func WithHelper(path string) Option { return func(c *config) { c.helperPath = path } }

// WithRecord records the first-touch order of chunks as a working-set
// profile named name (read it with Loader.Profile or Restore.Profile).
// Recording wants lazy mode: prefetched units raise no faults to record.
func WithRecord(name string) Option { return func(c *config) { c.record = name } }

// WithProfile selects the working set to replay and sets ModeWorkingSet.
func WithProfile(p ProfileSource) Option {
	return func(c *config) {
		c.profile = p
		c.mode = ModeWorkingSet
	}
}

// WithPrefetchRest makes a working-set restore prefetch every other unit
// after the working set.
func WithPrefetchRest(on bool) Option { return func(c *config) { c.prefetchRest = on } }
