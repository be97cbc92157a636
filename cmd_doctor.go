package main

import (
	"encoding/json"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/restore/doctor"
	"github.com/uffdrestore/uffdrestore/restore/uffd"
)

func init() {
	registerCommand(&cli.Command{
		Name:  "doctor",
		Usage: "check that this machine and user can restore lazily, and print the fix for each problem",
		Description: `doctor probes the kernel (version, userfaultfd features), the userfaultfd
permission model (root / CAP_SYS_PTRACE, vm.unprivileged_userfaultfd,
/dev/userfaultfd, UFFD_USER_MODE_ONLY), the huge page pools and the hugetlbfs
mounts, registers a real MINOR view on a hugetlb memfd and on a shmem memfd,
and says which restore backings (hugetlbfs, memfd-hugetlb, shmem) work for the
user running it. Every failing item comes with the command that fixes it.

It exits 0 when at least one lazy-restore backing works, 1 otherwise.

Examples:
   uffdrestore doctor
   uffdrestore doctor --json | jq '.backings[] | select(.usable) | .name'
   sudo -u nobody uffdrestore doctor     # what an unprivileged user gets`,
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: "print the full report, checks and backings as JSON"},
		},
		Action: runDoctor,
	})
}

func runDoctor(c *cli.Context) error {
	res := doctor.Check(uffd.Probe())
	w := c.App.Writer
	if w == nil {
		w = os.Stdout
	}
	if c.Bool("json") {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return err
		}
	} else {
		if err := res.WriteText(w); err != nil {
			return err
		}
	}
	if !res.OK {
		return cli.Exit("", 1)
	}
	return nil
}
