package main

import (
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/attach"
)

// loadCheckAttachable refuses, before anything is loaded, a snapshot no
// target could attach (see attach.CheckLayout: too many regions for the
// protocol or for vm.max_map_count, nothing to map), judged on the layout
// NewLoader would serve with opts. The server checks the real layout again
// when it starts listening.
func loadCheckAttachable(snap string, opts []restore.Option) error {
	plan, id, err := restore.PlanLayout(snap, opts...)
	if err != nil {
		return nil // NewLoader reports it (restore.ErrEmptySnapshot for an empty one)
	}
	return attach.CheckLayout(attach.HelloOf(plan, id))
}
