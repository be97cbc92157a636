package engine

import (
	"cmp"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc64"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/atomicfile"
	"github.com/uffdrestore/uffdrestore/snapshot"
)

// Working sets: record which chunks a restore touched first, in order, and
// replay that order as a prefetch ahead of the faults the next time (REAP,
// FaaSnap's loading set).

// recorder notes each chunk's first fault, in order. It does not allocate:
// its slice holds a place for every chunk.
type recorder struct {
	epoch   time.Time
	seen    []atomic.Bool
	mu      sync.Mutex
	entries []format.ProfileEntry
}

func newRecorder(chunks int, epoch time.Time) *recorder {
	return &recorder{epoch: epoch, seen: make([]atomic.Bool, chunks), entries: make([]format.ProfileEntry, 0, chunks)}
}

func (r *recorder) note(chunk int) {
	if chunk < 0 || chunk >= len(r.seen) || r.seen[chunk].Swap(true) {
		return
	}
	t := uint64(time.Since(r.epoch))
	r.mu.Lock()
	r.entries = append(r.entries, format.ProfileEntry{Chunk: uint32(chunk), Rank: uint32(len(r.entries)), TimeNS: t})
	r.mu.Unlock()
}

func (r *recorder) profile(name string) format.Profile {
	r.mu.Lock()
	defer r.mu.Unlock()
	return format.Profile{Name: name, Entries: append([]format.ProfileEntry(nil), r.entries...)}
}

// wsState is a working-set restore's profile and its accounting.
type wsState struct {
	name  string
	inSet []bool // per unit
	units int
}

// setupWorkingSet builds the prefetch order: in working-set mode the
// profile's units first (in recorded order), then every unit in file order.
// Prefetch runs through the profile part only, unless WithPrefetchRest or
// Wait asks for the rest.
func (e *engine) setupWorkingSet() error {
	all := make([]uint32, 0, 2*e.nUnits)
	limit := e.nUnits
	if e.cfg.mode == ModeWorkingSet {
		p, err := e.cfg.profile.resolve(e.r)
		if err != nil {
			return err
		}
		ws := &wsState{name: p.Name, inSet: make([]bool, e.nUnits)}
		entries := append([]format.ProfileEntry(nil), p.Entries...)
		sort.SliceStable(entries, func(i, j int) bool { return entries[i].Rank < entries[j].Rank })
		for _, en := range entries {
			u := int(en.Chunk) / e.chunksPerUnit
			if int(en.Chunk) >= e.r.NumChunks() || u >= e.nUnits {
				continue // resolve rejected profiles with these; be safe
			}
			if !ws.inSet[u] {
				ws.inSet[u] = true
				ws.units++
				all = append(all, uint32(u))
			}
		}
		e.ws = ws
		limit = len(all)
		if e.cfg.prefetchRest {
			limit += e.nUnits
		}
	}
	for u := 0; u < e.nUnits; u++ {
		all = append(all, uint32(u))
	}
	e.prefetchOrder = all
	e.prefetchLimit.Store(int64(limit))
	return nil
}

// ProfileSource says where a working-set profile comes from.
type ProfileSource struct {
	// Name selects a profile stored in the snapshot ("" with one profile:
	// that one; "" with several: all of them merged).
	Name string
	// File is a sidecar profile file written by SaveProfile.
	File string
	// Profile is a profile given directly.
	Profile *format.Profile
}

// resolve finds the profile and checks it belongs to this snapshot. A
// stale or foreign profile is rejected, never trusted blindly; so is one with
// entries beyond the snapshot (snapshot.CheckProfile: the one policy).
func (ps ProfileSource) resolve(r *format.Reader) (format.Profile, error) {
	var p format.Profile
	switch {
	case ps.Profile != nil:
		p = *ps.Profile
	case ps.File != "":
		sc, err := LoadSidecar(r, ps.File)
		if err != nil {
			return p, err
		}
		p = sc.Profile
	default:
		var err error
		if p, err = FindProfile(r, ps.Name); err != nil {
			return p, err
		}
	}
	if err := snapshot.CheckProfile(r, p); err != nil {
		return p, fmt.Errorf("%w: %w", ErrForeignProfile, err)
	}
	return p, nil
}

// FindProfile returns the profile called name stored in r; with name "",
// the only profile, or all of them merged (as a restore picks by default).
// A missing profile is an error wrapping ErrNoProfile.
func FindProfile(r *format.Reader, name string) (format.Profile, error) {
	ps := r.Profiles()
	if len(ps) == 0 {
		return format.Profile{}, fmt.Errorf("%w: the snapshot has no working-set profile (record one with a restore: uffdrestore load --record; or add a sidecar with: uffdrestore snapshot profile add SNAP --from FILE)", ErrNoProfile)
	}
	if name == "" {
		if len(ps) == 1 {
			return ps[0], nil
		}
		return MergeProfiles("merged", ps...), nil
	}
	for _, p := range ps {
		if p.Name == name {
			return p, nil
		}
	}
	return format.Profile{}, fmt.Errorf("%w: no profile %q in the snapshot (it has %s)", ErrNoProfile, name, ProfileNames(ps))
}

// ProfileNames lists the profiles' names, quoted ("none" for no profile).
func ProfileNames(ps []format.Profile) string {
	if len(ps) == 0 {
		return "none"
	}
	q := make([]string, len(ps))
	for i, p := range ps {
		q[i] = strconv.Quote(p.Name)
	}
	return strings.Join(q, ", ")
}

// LoadSidecar loads the sidecar profile file and checks that it belongs to
// the snapshot r: a profile recorded on another snapshot, or one naming
// chunks r does not have, is an error wrapping ErrForeignProfile.
func LoadSidecar(r *format.Reader, file string) (*SidecarProfile, error) {
	sc, err := LoadProfile(file)
	if err != nil {
		return nil, err
	}
	if err := sc.Check(r, file); err != nil {
		return nil, err
	}
	return sc, nil
}

// Check reports whether the sidecar profile (read from file, for messages)
// belongs to the snapshot r: recorded on another snapshot, or naming chunks
// r does not have, it is an error wrapping ErrForeignProfile.
func (sc *SidecarProfile) Check(r *format.Reader, file string) error {
	if id := SnapshotID(r); sc.SnapshotID != id {
		return fmt.Errorf("%w: %s is a foreign profile: recorded on snapshot %s (%d chunks of %s), this snapshot is %s (%d chunks of %s); record a profile on this snapshot",
			ErrForeignProfile, file, sc.SnapshotID, sc.Chunks, snapshot.HumanBytes(uint64(sc.ChunkSize)),
			id, r.NumChunks(), snapshot.HumanBytes(uint64(r.ChunkSize())))
	}
	if err := snapshot.CheckProfile(r, sc.Profile); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrForeignProfile, file, err)
	}
	return nil
}

// ReplaceProfile returns ps with p in the place of the profile of its name
// (later ones of that name dropped), or appended.
func ReplaceProfile(ps []format.Profile, p format.Profile) []format.Profile {
	out := make([]format.Profile, 0, len(ps)+1)
	done := false
	for _, q := range ps {
		if q.Name == p.Name {
			if !done {
				out = append(out, p)
				done = true
			}
			continue
		}
		out = append(out, q)
	}
	if !done {
		out = append(out, p)
	}
	return out
}

// StoreProfile stores p in the snapshot at path, whose profiles are
// existing: appended (only the index is rewritten), or, with replace, in the
// place of the profile of its name. Without replace, a profile of that name
// is an error wrapping ErrProfileExists.
func StoreProfile(path string, existing []format.Profile, p format.Profile, replace bool) error {
	for _, q := range existing {
		if q.Name == p.Name {
			if !replace {
				return fmt.Errorf("%w: the snapshot already has a profile %q: give another --name, or --replace", ErrProfileExists, p.Name)
			}
			return format.SetProfiles(path, ReplaceProfile(existing, p))
		}
	}
	return format.AppendProfile(path, p)
}

// Errors of working-set profiles.
var (
	ErrNoProfile      = errors.New("restore: no working-set profile")
	ErrForeignProfile = errors.New("restore: working-set profile does not belong to this snapshot")
	ErrProfileExists  = errors.New("restore: a working-set profile of that name exists")
)

// MergeProfiles unions profiles from several runs: every chunk any of them
// touched, ordered by its average first-touch rank (a chunk missing from a
// run counts as touched last in that run).
func MergeProfiles(name string, ps ...format.Profile) format.Profile {
	// A chunk's score is the sum of its ranks, counting a profile's length
	// where it is missing: every chunk starts at the sum of the lengths,
	// and each profile's entries replace their length by their rank. One
	// pass over the entries (the last entry of a chunk in a profile gives
	// its rank there; its first touch is its earliest anywhere).
	type acc struct {
		score int64 // the score less the sum of the lengths
		first uint64
		seen  int    // 1 + the index of the last profile that had the chunk
		last  uint32 // its rank there
	}
	m := map[uint32]*acc{}
	var chunks []uint32
	for i, p := range ps {
		n := int64(len(p.Entries))
		for _, e := range p.Entries {
			a := m[e.Chunk]
			if a == nil {
				a = &acc{first: e.TimeNS}
				m[e.Chunk] = a
				chunks = append(chunks, e.Chunk)
			}
			a.first = min(a.first, e.TimeNS)
			if a.seen == i+1 {
				a.score -= int64(a.last) - n // a later entry of the chunk replaces the earlier
			}
			a.score += int64(e.Rank) - n
			a.seen, a.last = i+1, e.Rank
		}
	}
	slices.SortFunc(chunks, func(x, y uint32) int {
		if c := cmp.Compare(m[x].score, m[y].score); c != 0 {
			return c
		}
		return cmp.Compare(x, y)
	})
	out := format.Profile{Name: name}
	for i, c := range chunks {
		out.Entries = append(out.Entries, format.ProfileEntry{Chunk: c, Rank: uint32(i), TimeNS: m[c].first})
	}
	return out
}

// SnapshotID identifies a snapshot's content: a CRC-64 over its chunk size
// and every chunk's length and checksum. A sidecar profile carries it.
func SnapshotID(r *format.Reader) string {
	h := crc64.New(crc64.MakeTable(crc64.ECMA))
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:], uint64(r.ChunkSize()))
	binary.LittleEndian.PutUint64(b[8:], uint64(r.NumChunks()))
	h.Write(b[:])
	for i := 0; i < r.NumChunks(); i++ {
		c := r.Chunk(i)
		binary.LittleEndian.PutUint32(b[:], c.RawLen)
		binary.LittleEndian.PutUint32(b[4:], c.CRC)
		h.Write(b[:8])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// SidecarProfile is a working-set profile stored beside a snapshot.
type SidecarProfile struct {
	Version    int            `json:"version"`
	SnapshotID string         `json:"snapshot_id"`
	ChunkSize  int            `json:"chunk_size"`
	Chunks     int            `json:"chunks"`
	Profile    format.Profile `json:"profile"`
}

// SaveProfile writes p as a sidecar file for the snapshot r.
func SaveProfile(path string, r *format.Reader, p format.Profile) error {
	b, err := json.MarshalIndent(SidecarProfile{Version: 1, SnapshotID: SnapshotID(r), ChunkSize: r.ChunkSize(), Chunks: r.NumChunks(), Profile: p}, "", " ")
	if err != nil {
		return err
	}
	return atomicfile.WriteBytes(path, 0o644, b)
}

// LoadProfile reads a sidecar profile file.
func LoadProfile(path string) (*SidecarProfile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("restore: profile: %w", err)
	}
	defer f.Close()
	var sc SidecarProfile
	dec := json.NewDecoder(&limitedReader{f, 256 << 20})
	if err := dec.Decode(&sc); err != nil {
		return nil, fmt.Errorf("restore: profile %s: %w", path, err)
	}
	if sc.Version != 1 {
		return nil, fmt.Errorf("restore: profile %s: version %d, want 1", path, sc.Version)
	}
	return &sc, nil
}

type limitedReader struct {
	f *os.File
	n int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errors.New("profile file larger than 256 MiB")
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.f.Read(p)
	l.n -= int64(n)
	return n, err
}
