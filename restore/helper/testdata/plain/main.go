// Command plain imports restore but not restore/helper: started as a
// helper would be, it must still run its own main, and its lazy Open must
// fail with restore.ErrNoHelper.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/uffdrestore/uffdrestore/restore"
)

func main() {
	fmt.Println("main ran")
	if len(os.Args) > 1 {
		r, err := restore.Open(context.Background(), os.Args[1], restore.WithBacking(restore.BackingShmem))
		switch {
		case errors.Is(err, restore.ErrNoHelper):
			fmt.Println("open: no helper:", err)
		case err != nil:
			fmt.Println("open: other error:", err)
		default:
			r.Close()
			fmt.Println("open: ok")
		}
	}
}
