package uffd

/*
#include <stdlib.h>
#include "ur_spawn.h"
*/
import "C"

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// Spawning is a program being started by a thread of its own
// (StartSpawn): Wait says how it went.
type Spawning struct {
	once sync.Once
	s    *C.struct_ur_spawn
	pid  int
	err  error
}

// StartSpawn starts the program at path with argv and env, with fds[i] as
// its descriptor i (at most 8; every other descriptor closed) and an empty
// signal mask, and returns without waiting for it: the fork and exec run
// on a thread of their own, which needs nothing of this process's Go
// runtime (posix_spawn returns only once the child has exec'd, which on a
// VM whose idle vCPU takes up to a scheduler tick to run a new task cost a
// caller 0.5-3.5 ms). The fds are duplicated at once; the caller may close
// its own. Errors of the fork or the exec come from Wait, which must be
// called once the child is needed, and at the latest to release it.
func StartSpawn(path string, argv, env []string, fds []int) (*Spawning, error) {
	if len(fds) > 8 {
		return nil, errors.New("uffd: StartSpawn: more than 8 descriptors")
	}
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	cargv, freeArgv := cStrings(argv)
	defer freeArgv()
	cenv, freeEnv := cStrings(env)
	defer freeEnv()
	var cfds [8]C.int
	for i, fd := range fds {
		cfds[i] = C.int(fd)
	}
	sp := &Spawning{}
	delay := C.unsigned(min(spawnDelay.Load(), int64(time.Second)) / int64(time.Microsecond))
	if rc := C.ur_spawn_start(cpath, cargv, cenv, &cfds[0], C.int(len(fds)), delay, &sp.s); rc < 0 {
		return nil, errno("spawn (duplicating its descriptors, starting its thread)", rc)
	}
	return sp, nil
}

// spawnDelay: SetSpawnDelay.
var spawnDelay atomic.Int64

// SetSpawnDelay makes every later StartSpawn's thread wait d (at most 1 s)
// before it forks: for tests, which show so that nothing, in this process
// or the child, waits for a spawn it does not need yet. 0 restores the
// default.
func SetSpawnDelay(d time.Duration) { spawnDelay.Store(int64(d)) }

// Wait waits until the program has been started (its exec done, or
// failed) and returns its pid, or the fork's or exec's error. Later calls
// return the same.
func (sp *Spawning) Wait() (int, error) {
	sp.once.Do(func() {
		var pid C.int
		rc := C.ur_spawn_wait(sp.s, &pid)
		sp.s = nil
		if rc < 0 {
			sp.err = errno("fork/exec", rc)
			return
		}
		sp.pid = int(pid)
	})
	return sp.pid, sp.err
}

// cStrings is v as a NULL-terminated C array of C strings, and its free.
func cStrings(v []string) (**C.char, func()) {
	arr := (*[1 << 28]*C.char)(C.malloc(C.size_t(len(v)+1) * C.size_t(unsafe.Sizeof((*C.char)(nil)))))[: len(v)+1 : len(v)+1]
	for i, s := range v {
		arr[i] = C.CString(s)
	}
	arr[len(v)] = nil
	return &arr[0], func() {
		for _, p := range arr[:len(v)] {
			C.free(unsafe.Pointer(p))
		}
		C.free(unsafe.Pointer(&arr[0]))
	}
}
