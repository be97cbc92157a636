package engine_test

// The lazy Opens of this package's tests (internal ones too: one test
// binary) need the fault-handler helper: this test binary is it, run again.
import _ "github.com/uffdrestore/uffdrestore/restore/helper"
