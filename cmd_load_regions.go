package main

import (
	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore/attach"
)

// loadCheckAttachable refuses, before anything is loaded, a snapshot no
// target could attach (see attach.CheckLayout: too many regions for the
// protocol or for vm.max_map_count, nothing to map). The server checks the
// real layout again when it starts listening.
func loadCheckAttachable(snap string) error {
	f, err := format.Open(snap)
	if err != nil {
		return nil // NewLoader reports it
	}
	defer f.Close()
	if f.TotalSize() == 0 {
		return nil // NewLoader names it: restore.ErrEmptySnapshot
	}
	var h attach.Hello
	for _, r := range f.Regions() {
		h.Regions = append(h.Regions, attach.Region{Name: r.Name, Size: (r.Length + 4095) &^ 4095, Length: r.Length})
	}
	return attach.CheckLayout(h)
}
