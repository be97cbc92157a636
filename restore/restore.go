package restore

// The public API. The work is done in restore/internal/engine (see the
// package documentation for the layout); this file names its types and
// functions here. The types are aliases: a restore.Loader is an
// engine.Loader, so restore/attach and restore/helper, which use the engine
// directly, take what a program built with this package.

import (
	"context"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/remote"
	"github.com/uffdrestore/uffdrestore/restore/internal/engine"
)

// ErrForeignBacking is returned (wrapped, naming what differs) by
// AdoptLoader for a backing file that cannot be the one a server of this
// snapshot created: another size, kind, owner or seals.
var ErrForeignBacking = engine.ErrForeignBacking

// AdoptInfo says what AdoptLoader found in the backing it adopted.
type AdoptInfo = engine.AdoptInfo

// AdoptLoader is NewLoader for a backing file that already holds the
// snapshot, or part of it: the backing of a server that died, handed back by
// a target that still maps it (restarting `uffdrestore load --adopt`). fd is
// the backing; the loader reopens it (through /proc/self/fd, O_RDWR) and
// the caller keeps fd.
func AdoptLoader(ctx context.Context, path string, fd int, opts ...Option) (*Loader, AdoptInfo, error) {
	return engine.AdoptLoader(ctx, path, fd, opts...)
}

// PlanLayout is the layout NewLoader(ctx, path, opts...) would serve,
// without creating a backing: what `load --adopt` announces to re-attaching
// targets before one of them hands the backing back. BackingAuto resolves as
// NewLoader resolves it now (the huge page pool's free pages included), so
// a restart names the backing the first server used (--backing).
// The second result is the snapshot's SnapshotID.
func PlanLayout(path string, opts ...Option) (Layout, string, error) {
	return engine.PlanLayout(path, opts...)
}

// BackingKind says what memory a restore is loaded into.
type BackingKind = engine.BackingKind

// BackingAuto picks a hugetlb memfd when the huge page pool has room
// for the whole snapshot and the kernel has minor faults on hugetlbfs
// for the userfaultfd this user can get (UFFD_USER_MODE_ONLY when not
// root: the one the view will use), else a shmem memfd.
const BackingAuto = engine.BackingAuto

// BackingHugetlbfs is a file in a hugetlbfs mount (WithHugetlbfsDir).
// It cannot be sealed against shrinking.
const BackingHugetlbfs = engine.BackingHugetlbfs

// BackingMemfdHugetlb is memfd_create(MFD_HUGETLB): huge pages, no mount.
const BackingMemfdHugetlb = engine.BackingMemfdHugetlb

// BackingShmem is a plain shmem memfd with 4 KiB pages.
const BackingShmem = engine.BackingShmem

// ParseBacking parses auto, hugetlbfs, memfd (or memfd-hugetlb) and shmem.
func ParseBacking(s string) (BackingKind, error) {
	return engine.ParseBacking(s)
}

// ErrNoHugePages is returned (wrapped, with the numbers and the fix) when
// the huge page pool has no room for the snapshot.
var ErrNoHugePages = engine.ErrNoHugePages

// DisablePoisonEnv, set to 1, makes the engine answer faults on units that
// failed to fill as on a kernel without UFFDIO_POISON (before Linux 6.6):
// by ending the view. For testing that path on newer kernels.
const DisablePoisonEnv = engine.DisablePoisonEnv

// WithFillJournal keeps a record of the units being filled in the file at
// path (4 bytes per unit, MAP_SHARED, so it outlives this process): a unit
// is marked when a filler claims it and unmarked once every byte of it is
// written. A server that died leaves marked the units it was in the middle
// of; AdoptLoader with the same journal punches those out of the backing
// before it learns which units are present, so a half-written unit is
// filled again instead of served (PROTOCOL.md §5.1). `uffdrestore load`
// keeps it beside its socket (SOCKET.fills) and removes it when it stops.
func WithFillJournal(path string) Option {
	return engine.WithFillJournal(path)
}

// Layout describes a loaded snapshot as the attach protocol sends it.
type Layout = engine.Layout

// LayoutRegion is one region of the snapshot in the backing file.
type LayoutRegion = engine.LayoutRegion

// Loader holds a snapshot loaded into a backing file and serves the faults
// of any number of views on it: the server side of `uffdrestore load`, and
// the engine of the in-process helper.
type Loader = engine.Loader

// NewLoader opens the snapshot at path and creates its backing. In eager
// mode it returns once every chunk is in the backing; in prefetch mode the
// fill runs on in the background; in lazy mode nothing is filled until a
// view faults.
func NewLoader(ctx context.Context, path string, opts ...Option) (*Loader, error) {
	return engine.NewLoader(ctx, path, opts...)
}

// ErrEmptySnapshot is returned (wrapped, naming the file) for a snapshot
// that holds no memory: there is nothing to restore or serve.
var ErrEmptySnapshot = engine.ErrEmptySnapshot

// Restore is a snapshot restored into this process: one view of the whole
// backing, as a []byte, filled lazily (or eagerly) from the snapshot.
type Restore = engine.Restore

// Open restores the snapshot at path into this process. It returns as soon
// as the view is usable: in lazy mode (the default) nothing has been read
// yet; the first touch of each unit fills it.
func Open(ctx context.Context, path string, opts ...Option) (*Restore, error) {
	return engine.Open(ctx, path, opts...)
}

// ErrNoHelper: a lazy, prefetch or working-set Open in a program that did
// not opt in to the fault-handler helper (see the package documentation).
var ErrNoHelper = engine.ErrNoHelper

// ErrHelperDied ends a lazy, prefetch or working-set restore (from Wait,
// Stats and Profile) whose fault-handler helper process died more than
// MaxHelperRespawns times, or could not be replaced. A thread that touches
// a page of the view not filled yet then stays blocked in its fault:
// nothing else can serve it without risking wrong bytes. Close the restore
// (no fault is pending once the view is unmapped) and Open it again.
var ErrHelperDied = engine.ErrHelperDied

// MaxHelperRespawns bounds how many times a restore replaces a helper that
// died.
const MaxHelperRespawns = engine.MaxHelperRespawns

// Mode says when chunks are filled.
type Mode = engine.Mode

// ModeLazy fills a unit only when a view faults on it: the fastest time
// to ready, and the least work for sparse access.
const ModeLazy = engine.ModeLazy

// ModeEager fills every unit in parallel before the restore is ready:
// no fault costs afterwards.
const ModeEager = engine.ModeEager

// ModePrefetch is lazy plus idle workers filling the rest in file
// order; faults jump the queue.
const ModePrefetch = engine.ModePrefetch

// ModeWorkingSet is lazy plus a recorded working set (WithProfile)
// filled first, in recorded order; faults still jump the queue. With
// WithPrefetchRest the rest follows.
const ModeWorkingSet = engine.ModeWorkingSet

// ParseMode parses lazy, eager and prefetch.
func ParseMode(s string) (Mode, error) {
	return engine.ParseMode(s)
}

// DefaultSpin is how long a fault loop busy-polls for the next fault before
// it waits in the poller: none. Measured here (BenchmarkFaultLatency, a present
// unit's fault in a second view), spinning 50 µs or even 1 ms left the p50
// (11–14 µs) unchanged and did not lower the p99: what a fault costs is
// mostly waking the faulting thread, not the handler; and on two vCPUs a
// spinning handler takes a core from the fillers. See the package
// documentation.
const DefaultSpin = engine.DefaultSpin

// Option configures a restore.
type Option = engine.Option

// WithRemote sets how a snapshot given as an http:// or https:// URL is
// read (parallel requests, timeouts, retries, headers; see package remote).
// Its Client is not used by the fault-handler helper of Open, which makes
// its own.
func WithRemote(o remote.Options) Option {
	return engine.WithRemote(o)
}

// WithMode sets the mode (default lazy).
func WithMode(m Mode) Option {
	return engine.WithMode(m)
}

// WithBacking sets the backing kind (default auto).
func WithBacking(k BackingKind) Option {
	return engine.WithBacking(k)
}

// ForTargets says a Loader serves targets that map each region on its own
// (the attach protocol's clients do): every non-empty region must then
// start on a page boundary of the backing. A snapshot whose chunks are
// smaller than a huge page (--chunk-size 64K, usual for --from-pid) does
// not guarantee that for huge pages: auto then picks shmem, and an explicit
// huge-page backing is refused with that fix.
func ForTargets() Option {
	return engine.ForTargets()
}

// WithHugetlbfsDir sets the hugetlbfs mount for BackingHugetlbfs.
func WithHugetlbfsDir(dir string) Option {
	return engine.WithHugetlbfsDir(dir)
}

// WithWorkers sets the number of filler goroutines (default: the number of
// CPUs).
func WithWorkers(n int) Option {
	return engine.WithWorkers(n)
}

// WithSpin sets how long a fault loop busy-polls before sleeping (0: never
// spin).
func WithSpin(d time.Duration) Option {
	return engine.WithSpin(d)
}

// WithPremap sets whether units filled ahead of a fault (eager, prefetch, or
// another view's fault) are mapped into every view at once, so a later touch
// costs no fault (default true).
func WithPremap(on bool) Option {
	return engine.WithPremap(on)
}

// PrestartHelper starts a fault-handler helper process now and keeps it
// for the next lazy, prefetch or working-set Open of this program with the
// same helper executable (WithHelper among opts, else this program), which
// then hands it its job instead of starting a process: that Open's first
// byte does not wait for a process to start (its exec and Go runtime
// start, 10+ ms on a 2-vCPU VM, most of a cold first byte). Each Open that
// takes it starts the next one in the background, so a program that
// restores again and again keeps one ready (one idle process);
// StopPrestartedHelper ends that. The helper runs with the environment the
// program had when it was started. It returns ErrNoHelper in a program
// without the helper (see the package documentation).
func PrestartHelper(opts ...Option) error { return engine.PrestartHelper(opts...) }

// StopPrestartedHelper stops the helper PrestartHelper keeps ready, and
// the replacing of it.
func StopPrestartedHelper() { engine.StopPrestartedHelper() }

// WithHelper sets the executable that runs the fault handler of an
// in-process restore (default: this program itself, /proc/self/exe). It
// must import restore/helper (see the package documentation); it is run
// with argv[0] "uffdrestore-helper".
func WithHelper(path string) Option {
	return engine.WithHelper(path)
}

// WithRecord records the first-touch order of chunks as a working-set
// profile named name (read it with Loader.Profile or Restore.Profile).
// Recording wants lazy mode: prefetched units raise no faults to record.
func WithRecord(name string) Option {
	return engine.WithRecord(name)
}

// WithProfile selects the working set to replay and sets ModeWorkingSet.
func WithProfile(p ProfileSource) Option {
	return engine.WithProfile(p)
}

// WithPrefetchRest makes a working-set restore prefetch every other unit
// after the working set.
func WithPrefetchRest(on bool) Option {
	return engine.WithPrefetchRest(on)
}

// ErrNoRegion: no region has the name asked for.
var ErrNoRegion = engine.ErrNoRegion

// ErrAmbiguousRegion matches an *AmbiguousRegionError with errors.Is.
var ErrAmbiguousRegion = engine.ErrAmbiguousRegion

// AmbiguousRegionError: several regions have the name asked for.
type AmbiguousRegionError = engine.AmbiguousRegionError

// Stats are a restore's figures. All durations are in nanoseconds in JSON.
type Stats = engine.Stats

// Percentiles summarises a latency histogram.
type Percentiles = engine.Percentiles

// FirstByteTrace cuts a lazy restore's time to the first byte at each step
// of the fault handler's start and of the first fault (Stats.FirstByte).
type FirstByteTrace = engine.FirstByteTrace

// WorkingSetStats says how well a working-set profile predicted the faults.
type WorkingSetStats = engine.WorkingSetStats

// ViewRange is one mapping of the backing in a view: Size bytes of the
// backing at Offset, mapped at Base in the view's address space.
type ViewRange = engine.ViewRange

// View is one address space whose faults the engine serves: an attached
// target process, or the in-process restore. It owns its userfaultfd.
type View = engine.View

// ProfileSource says where a working-set profile comes from.
type ProfileSource = engine.ProfileSource

// FindProfile returns the profile called name stored in r; with name "",
// the only profile, or all of them merged (as a restore picks by default).
// A missing profile is an error wrapping ErrNoProfile.
func FindProfile(r *format.Reader, name string) (format.Profile, error) {
	return engine.FindProfile(r, name)
}

// ProfileNames lists the profiles' names, quoted ("none" for no profile).
func ProfileNames(ps []format.Profile) string {
	return engine.ProfileNames(ps)
}

// LoadSidecar loads the sidecar profile file and checks that it belongs to
// the snapshot r: a profile recorded on another snapshot, or one naming
// chunks r does not have, is an error wrapping ErrForeignProfile.
func LoadSidecar(r *format.Reader, file string) (*SidecarProfile, error) {
	return engine.LoadSidecar(r, file)
}

// ReplaceProfile returns ps with p in the place of the profile of its name
// (later ones of that name dropped), or appended.
func ReplaceProfile(ps []format.Profile, p format.Profile) []format.Profile {
	return engine.ReplaceProfile(ps, p)
}

// StoreProfile stores p in the snapshot at path, whose profiles are
// existing: appended (only the index is rewritten), or, with replace, in the
// place of the profile of its name. Without replace, a profile of that name
// is an error wrapping ErrProfileExists.
func StoreProfile(path string, existing []format.Profile, p format.Profile, replace bool) error {
	return engine.StoreProfile(path, existing, p, replace)
}

var ErrNoProfile = engine.ErrNoProfile

var ErrForeignProfile = engine.ErrForeignProfile

var ErrProfileExists = engine.ErrProfileExists

// MergeProfiles unions profiles from several runs: every chunk any of them
// touched, ordered by its average first-touch rank (a chunk missing from a
// run counts as touched last in that run).
func MergeProfiles(name string, ps ...format.Profile) format.Profile {
	return engine.MergeProfiles(name, ps...)
}

// SnapshotID identifies a snapshot's content: a CRC-64 over its chunk size
// and every chunk's length and checksum. A sidecar profile carries it.
func SnapshotID(r *format.Reader) string {
	return engine.SnapshotID(r)
}

// SidecarProfile is a working-set profile stored beside a snapshot.
type SidecarProfile = engine.SidecarProfile

// SaveProfile writes p as a sidecar file for the snapshot r.
func SaveProfile(path string, r *format.Reader, p format.Profile) error {
	return engine.SaveProfile(path, r, p)
}

// LoadProfile reads a sidecar profile file.
func LoadProfile(path string) (*SidecarProfile, error) {
	return engine.LoadProfile(path)
}
