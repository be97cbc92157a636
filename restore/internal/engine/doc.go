// Package engine restores uffdrestore snapshots: package restore's API is
// its names (see restore's documentation for what it does and why), and
// restore/attach and restore/helper serve its Loader to other processes.
//
// The files follow the data path, snapshot → reader → fillers → alias →
// CONTINUE → view:
//
//	loader.go       Loader: a snapshot (format.Reader) loaded into a backing, serving views
//	backing.go      the backing file (hugetlb memfd, hugetlbfs file, shmem memfd)
//	engine.go       units and their states, the filler workers decoding into the alias,
//	                prefetch, readahead, split first touch; remotefetch.go for an http snapshot
//	view.go         a view (a registered mapping of the backing) and its fault loop:
//	                UFFDIO_CONTINUE (or POISON) per fault, premap, events
//	regions.go      the layout of the regions in the backing (the one conversion from format.Region)
//	stats.go        counters and latency histograms behind Stats
//	workingset.go   recording and replaying working-set profiles
//	journal.go      the fill journal; adopt.go: a new Loader on a backing a dead one filled
//	open.go         the in-process Open: the view in this process, served by a helper process
//	options.go      modes and options
package engine
