package engine

import (
	"encoding/json"
	"sync"
	"time"

	"github.com/uffdrestore/uffdrestore/restore/internal/helperlink"
)

// The prestarted helper: a helper process started ahead of the next lazy
// Open (PrestartHelper), waiting for its job. An Open that takes it does
// not wait for a process to start: on a 2-vCPU VM, fork+exec+exit of a C
// program costs 3+ ms and the start of a Go program 7+ ms, most of a cold
// first byte.

var prestart struct {
	mu    sync.Mutex
	on    bool
	exe   string
	spare helperlink.Spawned
	pid   int // spare's process id (tests)
}

// PrestartHelper starts a fault-handler helper process now and keeps it
// for the next lazy, prefetch or working-set Open of this program with the
// same helper executable (WithHelper among opts, else this program), which
// hands it its job instead of starting a process. Each Open that takes it
// starts the next one in the background, so a program that restores again
// and again keeps one ready; StopPrestartedHelper ends that. The helper
// runs with the environment the program has when it is started.
func PrestartHelper(opts ...Option) error {
	if helperlink.Spawn == nil {
		return ErrNoHelper
	}
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	sp, err := helperlink.Spawn(cfg.helperExe())
	if err != nil {
		return err
	}
	prestart.mu.Lock()
	old := prestart.spare
	prestart.on, prestart.exe, prestart.spare, prestart.pid = true, cfg.helperExe(), sp, spawnedPid(sp)
	prestart.mu.Unlock()
	if old != nil {
		old.Abandon()
	}
	return nil
}

// StopPrestartedHelper stops the helper PrestartHelper keeps ready, and
// the replacing of it.
func StopPrestartedHelper() {
	prestart.mu.Lock()
	sp := prestart.spare
	prestart.on, prestart.spare, prestart.pid = false, nil, 0
	prestart.mu.Unlock()
	if sp != nil {
		sp.Abandon()
	}
}

// takePrestarted returns the prestarted helper for exe, if there is one.
// The caller starts its successor with replenish once the helper it took
// serves (so that the successor's start does not compete for the CPUs with
// that helper's start).
func takePrestarted(exe string) helperlink.Spawned {
	prestart.mu.Lock()
	defer prestart.mu.Unlock()
	if !prestart.on || prestart.exe != exe || prestart.spare == nil {
		return nil
	}
	sp := prestart.spare
	prestart.spare, prestart.pid = nil, 0
	return sp
}

// replenishDelay is how long after the taken helper serves its successor
// starts: a process start takes both CPUs of a small VM for 10+ ms, which
// the taken helper's first fills need (measured: started at once, it moved
// a prestarted first byte from ~12 to ~30 ms).
const replenishDelay = 100 * time.Millisecond

// replenish starts the successor of a prestarted helper taken for exe, in
// the background, replenishDelay after ready is closed (or after a few
// seconds).
func replenish(exe string, ready <-chan struct{}) {
	go func() {
		select {
		case <-ready:
		case <-time.After(5 * time.Second):
		}
		time.Sleep(replenishDelay)
		prestart.mu.Lock()
		wanted := prestart.on && prestart.exe == exe && prestart.spare == nil
		prestart.mu.Unlock()
		if !wanted {
			return
		}
		next, err := helperlink.Spawn(exe)
		if err != nil {
			return // the next Open starts its own
		}
		prestart.mu.Lock()
		defer prestart.mu.Unlock()
		if !prestart.on || prestart.exe != exe || prestart.spare != nil {
			next.Abandon()
			return
		}
		prestart.spare, prestart.pid = next, spawnedPid(next)
	}()
}

func spawnedPid(sp helperlink.Spawned) int {
	if p, ok := sp.(interface{ Pid() int }); ok {
		return p.Pid()
	}
	return 0
}

func init() { helperlink.WarmUp = warmUp }

// warmUp runs, in a helper process started ahead of its job, the first use
// of what the job's first steps use: the JSON codec of the helper
// configuration (encoding/json builds a type's codec by reflection on its
// first use: 0.4-1.2 ms of a prestarted first byte of 7-8 ms, measured).
func warmUp() {
	if b, err := json.Marshal(helperConfig{Mode: ModeLazy}); err == nil {
		var hc helperConfig
		json.Unmarshal(b, &hc)
	}
}
