package engine

import (
	"encoding/json"
	"math/bits"
	"sync/atomic"
	"time"

	"github.com/uffdrestore/uffdrestore/remote"
)

// Stats are a restore's figures. All durations are in nanoseconds in JSON.
type Stats struct {
	Mode    string `json:"mode"`
	Backing string `json:"backing"`
	Views   int    `json:"views"`

	Chunks          int   `json:"chunks"`            // chunks in the snapshot
	Units           int   `json:"units"`             // fill units (max of chunk and page size)
	UnitsPresent    int64 `json:"units_present"`     // units in the page cache now
	FaultsMinor     int64 `json:"faults_minor"`      // faults on pages in the page cache
	FaultsMissing   int64 `json:"faults_missing"`    // faults on pages not allocated yet
	FaultsWaited    int64 `json:"faults_waited"`     // faults that found their unit being filled
	FilledByFault   int64 `json:"filled_by_fault"`   // units filled because a fault asked
	FilledByPrefill int64 `json:"filled_by_prefill"` // units filled by eager, prefetch, working set or readahead
	Readahead       int64 `json:"readahead"`         // of those, units filled ahead of sequential faults
	SplitParts      int64 `json:"split_parts"`       // chunks of faulted units decoded by another (idle) worker
	Refills         int64 `json:"refills"`           // units filled again after their pages were punched out
	ZeroChunks      int64 `json:"zero_chunks"`       // zero chunks met (no decompression)
	BytesDecoded    int64 `json:"bytes_decoded"`     // uncompressed bytes written into the backing
	BytesRead       int64 `json:"bytes_read"`        // stored bytes read from the snapshot
	Continues       int64 `json:"continues"`         // UFFDIO_CONTINUE calls
	Premapped       int64 `json:"premapped"`         // units mapped into views before any fault
	Poisoned        int64 `json:"poisoned"`          // units poisoned after a checksum failure
	Errors          int64 `json:"errors"`
	Reads           int64 `json:"reads"` // preads of chunk data (coalesced reads count once)

	// Remote is filled for a snapshot read from an HTTP server.
	Remote *remote.Stats `json:"remote,omitempty"`

	// Restore.Stats of a lazy, prefetch or working-set Open: the helper
	// process serving the view now, and how many helpers that died it
	// replaced (the figures above are the current helper's).
	HelperPID      int `json:"helper_pid,omitempty"`
	HelperRespawns int `json:"helper_respawns,omitempty"`

	// WorkingSet is filled in working-set mode.
	WorkingSet *WorkingSetStats `json:"working_set,omitempty"`

	TimeToReady time.Duration `json:"time_to_ready_ns"`
	// TimeToFirstByte is what a user waits for the first byte: from the
	// start of Open (NewLoader) to the first fault answered, when the first
	// touch came at once; a lazy Open returns before its helper serves, so
	// this is TimeToReady plus the helper's start and the first fill. Eager:
	// TimeToReady. 0 while no fault has been answered (a touch of a unit
	// filled already needs none).
	TimeToFirstByte time.Duration `json:"time_to_first_byte_ns,omitempty"`
	// FirstFaultAt is when the first fault was answered (wall clock).
	FirstFaultAt time.Time `json:"first_fault_at,omitzero"`
	// FirstByte is where the wait for the first byte went: TimeToFirstByte
	// cut at the steps of the fault handler's start and of the first fault
	// (nil before the first fault is answered).
	FirstByte *FirstByteTrace `json:"first_byte,omitempty"`
	// FirstByteMarks are FirstByte's steps as wall-clock Unix ns (0: not
	// reached), in FirstByteTrace's order from Loader on: how a helper
	// process hands them to its parent, which knows when Open started.
	FirstByteMarks []int64 `json:"first_byte_marks,omitempty"`

	FillTime time.Duration `json:"fill_time_ns,omitempty"` // eager/prefetch: until every unit was present

	// Fault service time, handler side: message read → CONTINUE done.
	FaultLatency Percentiles `json:"fault_latency"`
	LastError    string      `json:"last_error,omitempty"`
}

// FirstByteTrace cuts the time to the first byte of a lazy restore at each
// step, every figure from the start of Open (NewLoader in process), so each
// step's cost is the difference to the one before. With a helper process,
// Ready comes first and the helper's steps overlap nothing after it.
type FirstByteTrace struct {
	Ready     time.Duration `json:"ready_ns"`      // Open returned (TimeToReady)
	Loader    time.Duration `json:"loader_ns"`     // the fault handler's loader built: its index parsed, the backing mapped, the fillers started (a helper: after it got its job)
	Serving   time.Duration `json:"serving_ns"`    // its first view's fault loop running
	FaultRead time.Duration `json:"fault_read_ns"` // the first fault read from the userfaultfd
	FillStart time.Duration `json:"fill_start_ns"` // a filler began that fault's unit (the first fault's own fill)
	Filled    time.Duration `json:"filled_ns"`     // the unit in the backing: its chunks read, decompressed, checked
	Answered  time.Duration `json:"answered_ns"`   // the fault answered (UFFDIO_CONTINUE): TimeToFirstByte
}

// firstByteTrace makes the trace of marks (FirstByteMarks) against start,
// or nil when a step is missing or out of order (no fault answered yet; the
// first fault found its unit filled by another path, prefetch or a working
// set; or another unit's fault was answered first).
func firstByteTrace(start time.Time, ready time.Duration, marks []int64) *FirstByteTrace {
	if start.IsZero() || len(marks) != 6 {
		return nil
	}
	var d [6]time.Duration
	for i, m := range marks {
		if m == 0 {
			return nil
		}
		d[i] = max(0, time.Unix(0, m).Sub(start))
	}
	for i := 1; i < len(d); i++ {
		if d[i] < d[i-1] {
			return nil
		}
	}
	return &FirstByteTrace{Ready: ready, Loader: d[0], Serving: d[1], FaultRead: d[2], FillStart: d[3], Filled: d[4], Answered: d[5]}
}

// JSON returns the stats as indented JSON.
func (s Stats) JSON() []byte {
	b, _ := json.MarshalIndent(s, "", "  ")
	return b
}

// Percentiles summarises a latency histogram.
type Percentiles struct {
	Count int64         `json:"count"`
	P50   time.Duration `json:"p50_ns"`
	P90   time.Duration `json:"p90_ns"`
	P99   time.Duration `json:"p99_ns"`
	Max   time.Duration `json:"max_ns"`
}

// histogram is a log-linear latency histogram with about 3% resolution:
// 32 sub-buckets per power of two, from 1 ns to ~1 minute. Record is
// lock-free and does not allocate.
type histogram struct {
	counts [36 * 32]atomic.Int64
	max    atomic.Int64
}

const subBits = 5

func bucketOf(ns int64) int {
	if ns < 1<<subBits {
		if ns < 0 {
			return 0
		}
		return int(ns)
	}
	exp := bits.Len64(uint64(ns)) - 1 // >= subBits
	sub := int(ns>>(exp-subBits)) & (1<<subBits - 1)
	b := (exp-subBits+1)<<subBits | sub
	if b >= 36*32 {
		return 36*32 - 1
	}
	return b
}

// bucketLow is the smallest value in bucket b.
func bucketLow(b int) int64 {
	if b < 1<<subBits {
		return int64(b)
	}
	exp := b>>subBits + subBits - 1
	sub := int64(b & (1<<subBits - 1))
	return (1<<subBits | sub) << (exp - subBits)
}

func (h *histogram) record(d time.Duration) {
	ns := int64(d)
	h.counts[bucketOf(ns)].Add(1)
	for {
		m := h.max.Load()
		if ns <= m || h.max.CompareAndSwap(m, ns) {
			return
		}
	}
}

func (h *histogram) merge(o *histogram) {
	for i := range o.counts {
		if n := o.counts[i].Load(); n != 0 {
			h.counts[i].Add(n)
		}
	}
	for {
		m, om := h.max.Load(), o.max.Load()
		if om <= m || h.max.CompareAndSwap(m, om) {
			return
		}
	}
}

func (h *histogram) percentiles() Percentiles {
	var total int64
	var counts [len(histogram{}.counts)]int64
	for i := range h.counts {
		counts[i] = h.counts[i].Load()
		total += counts[i]
	}
	p := Percentiles{Count: total, Max: time.Duration(h.max.Load())}
	if total == 0 {
		return p
	}
	at := func(q float64) time.Duration {
		rank := int64(q*float64(total) + 0.5)
		if rank < 1 {
			rank = 1
		}
		var seen int64
		for i, c := range counts {
			seen += c
			if seen >= rank {
				v := time.Duration(bucketLow(i))
				if v > p.Max {
					v = p.Max
				}
				return v
			}
		}
		return p.Max
	}
	p.P50, p.P90, p.P99 = at(0.50), at(0.90), at(0.99)
	return p
}

// counters are the atomic counters behind Stats.
type counters struct {
	faultsMinor, faultsMissing, faultsWaited atomic.Int64
	filledByFault, filledByPrefill, refills  atomic.Int64
	zeroChunks, bytesDecoded, bytesRead      atomic.Int64
	continues, premapped, poisoned, errors   atomic.Int64
	reads, readahead, splitParts             atomic.Int64
	wsPrefilled, wsLate, wsMissed            atomic.Int64
	latency                                  histogram
}

func (c *counters) fill(s *Stats) {
	s.FaultsMinor = c.faultsMinor.Load()
	s.FaultsMissing = c.faultsMissing.Load()
	s.FaultsWaited = c.faultsWaited.Load()
	s.FilledByFault = c.filledByFault.Load()
	s.FilledByPrefill = c.filledByPrefill.Load()
	s.Refills = c.refills.Load()
	s.ZeroChunks = c.zeroChunks.Load()
	s.BytesDecoded = c.bytesDecoded.Load()
	s.BytesRead = c.bytesRead.Load()
	s.Continues = c.continues.Load()
	s.Premapped = c.premapped.Load()
	s.Poisoned = c.poisoned.Load()
	s.Errors = c.errors.Load()
	s.Reads = c.reads.Load()
	s.Readahead = c.readahead.Load()
	s.SplitParts = c.splitParts.Load()
	s.FaultLatency = c.latency.percentiles()
}

// WorkingSetStats says how well a working-set profile predicted the faults.
type WorkingSetStats struct {
	Profile   string `json:"profile"`
	Units     int    `json:"units"`     // units in the profile
	Prefilled int64  `json:"prefilled"` // profile units filled before any fault asked: faults avoided
	Late      int64  `json:"late"`      // profile units a fault needed before the prefetch got there
	Missed    int64  `json:"missed"`    // units faulted that the profile did not have
}
