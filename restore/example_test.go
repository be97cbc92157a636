package restore_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore"
)

var firstByte byte

// makeSnapshot writes a two-region snapshot for the examples.
func makeSnapshot(dir string) string {
	path := filepath.Join(dir, "example.snap")
	f, err := os.Create(path)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	w, err := format.NewWriter(f, format.WriterOptions{ChunkSize: 64 << 10})
	if err != nil {
		log.Fatal(err)
	}
	w.BeginRegion("heap", 0x7f0000000000, 3)
	for i := 0; i < 1000; i++ {
		fmt.Fprintf(w, "object %04d ", i)
	}
	w.EndRegion()
	w.BeginRegion("stack", 0x7ffd00000000, 3)
	w.Write(make([]byte, 1<<20)) // all zero: stored as nothing
	w.EndRegion()
	if err := w.Close(); err != nil {
		log.Fatal(err)
	}
	return path
}

// Open restores a snapshot into this process lazily: the view is usable at
// once, and each chunk is decompressed on its first touch, from any
// goroutine.
func ExampleOpen() {
	dir, _ := os.MkdirTemp("", "uffdrestore-example-")
	defer os.RemoveAll(dir)
	path := makeSnapshot(dir)

	r, err := restore.Open(context.Background(), path, restore.WithBacking(restore.BackingShmem))
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()

	heap := r.Region("heap") // nothing decompressed yet
	fmt.Printf("%q\n", heap[12*41:12*42])
	s, _ := r.Stats(context.Background())
	fmt.Println("units filled:", s.FilledByFault, "of", s.Units)
	// Output:
	// "object 0041 "
	// units filled: 1 of 17
}

// A Loader serves the faults of other processes' views: the server side of
// `uffdrestore load` (targets attach with restore/attach or the C client).
func ExampleNewLoader() {
	dir, _ := os.MkdirTemp("", "uffdrestore-example-")
	defer os.RemoveAll(dir)
	path := makeSnapshot(dir)

	l, err := restore.NewLoader(context.Background(), path, restore.WithBacking(restore.BackingShmem), restore.WithMode(restore.ModeEager))
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	for _, reg := range l.Layout().Regions {
		fmt.Printf("%s: %d bytes at backing offset %#x\n", reg.Name, reg.Length, reg.Offset)
	}
	fmt.Println("all present:", l.Stats().UnitsPresent == int64(l.Stats().Units))
	// Output:
	// heap: 12000 bytes at backing offset 0x0
	// stack: 1048576 bytes at backing offset 0x10000
	// all present: true
}

// Record the first-touch order of one restore, then replay it: the next
// restore fills the working set before anything faults.
func ExampleWithRecord() {
	dir, _ := os.MkdirTemp("", "uffdrestore-example-")
	defer os.RemoveAll(dir)
	path := makeSnapshot(dir)
	ctx := context.Background()

	r, err := restore.Open(ctx, path, restore.WithBacking(restore.BackingShmem), restore.WithRecord("boot"))
	if err != nil {
		log.Fatal(err)
	}
	firstByte = r.Region("heap")[0] // the workload: touch the heap
	profile, _ := r.Profile(ctx)
	r.Close()
	if err := format.AppendProfile(path, profile); err != nil {
		log.Fatal(err)
	}

	r2, err := restore.Open(ctx, path, restore.WithBacking(restore.BackingShmem), restore.WithProfile(restore.ProfileSource{Name: "boot"}))
	if err != nil {
		log.Fatal(err)
	}
	defer r2.Close()
	fmt.Println("profile chunks:", len(profile.Entries))
	// Output:
	// profile chunks: 1
}
