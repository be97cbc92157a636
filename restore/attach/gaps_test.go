package attach

import (
	"encoding/json"
	"testing"

	"github.com/uffdrestore/uffdrestore/restore"
)

// TestStatsScope: a target's stats count its own faults, the members
// describing the shared backing (units_present, units) are the same for
// every target, and the fill counters, which belong to no target, are 0
// (PROTOCOL.md §3.5).
func TestStatsScope(t *testing.T) {
	requireUffd(t, false)
	regions := []snapRegion{{"a", 0, memImage(1<<20, 21)}}
	snap := writeSnapshot(t, regions, 64<<10)
	l := newLoader(t, snap, restore.BackingShmem)
	_, sock := listen(t, FromLoader(l), Options{})
	reader, err := Dial(sock, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	idle, err := Dial(sock, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	touchFromC(reader)
	var sum byte
	for _, b := range reader.Regions[0].Data {
		sum += b
	}
	type st struct {
		FaultsMinor   int64 `json:"faults_minor"`
		FaultsMissing int64 `json:"faults_missing"`
		Continues     int64 `json:"continues"`
		FilledByFault int64 `json:"filled_by_fault"`
		UnitsPresent  int64 `json:"units_present"`
		Units         int   `json:"units"`
		Views         int   `json:"views"`
	}
	get := func(c *Client) st {
		raw, err := c.Stats()
		if err != nil {
			t.Fatal(err)
		}
		var s st
		if err := json.Unmarshal(raw, &s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	r, i := get(reader), get(idle)
	t.Logf("reader %+v, idle %+v (checksum %d)", r, i, sum)
	if r.FaultsMinor+r.FaultsMissing == 0 || r.Continues == 0 {
		t.Errorf("the reader's stats show no faults: %+v", r)
	}
	if i.FaultsMinor+i.FaultsMissing != 0 {
		t.Errorf("the idle target's stats show faults it never took: %+v", i)
	}
	if r.FilledByFault != 0 || i.FilledByFault != 0 {
		t.Errorf("filled_by_fault in a target's stats: %d, %d (fills belong to no target)", r.FilledByFault, i.FilledByFault)
	}
	if r.UnitsPresent == 0 || r.UnitsPresent != i.UnitsPresent || r.Units != i.Units || r.Views != 1 || i.Views != 1 {
		t.Errorf("shared members differ or are wrong: reader %+v, idle %+v", r, i)
	}
}
