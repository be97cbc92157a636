package main

import (
	"context"
	"os"
	"os/signal"
	"sync"
	"syscall"
)

// shutdownSignals is the one owner of SIGINT and SIGTERM for a command: a
// single goroutine reads the signal channel for the command's whole life; the
// first signal cancels Graceful, the second cancels Force. Everyone else only
// watches those contexts, so no signal is ever taken by a reader that no
// longer acts on it (the way a second reader of the channel lost one).
type shutdownSignals struct {
	Graceful context.Context // cancelled by the first signal (or the parent)
	Force    context.Context // cancelled by the second signal

	mu   sync.Mutex
	sig  os.Signal
	stop func()
}

// notifyShutdown starts watching SIGINT and SIGTERM; call stop when done.
func notifyShutdown(parent context.Context) *shutdownSignals {
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	g, cancelG := context.WithCancel(parent)
	f, cancelF := context.WithCancel(context.Background())
	s := &shutdownSignals{Graceful: g, Force: f}
	done := make(chan struct{})
	go func() {
		n := 0
		for {
			select {
			case sig := <-ch:
				n++
				if n == 1 {
					s.mu.Lock()
					s.sig = sig
					s.mu.Unlock()
					cancelG()
				} else {
					cancelF()
				}
			case <-done:
				return
			}
		}
	}()
	var once sync.Once
	s.stop = func() {
		once.Do(func() {
			signal.Stop(ch)
			close(done)
			cancelG()
			cancelF()
		})
	}
	return s
}

// Reason says why Graceful ended: the signal, or the parent's error.
func (s *shutdownSignals) Reason() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sig != nil {
		return "got " + s.sig.String()
	}
	if err := s.Graceful.Err(); err != nil {
		return err.Error()
	}
	return ""
}

// Signalled reports whether a signal (not the parent) ended Graceful.
func (s *shutdownSignals) Signalled() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sig != nil
}

func (s *shutdownSignals) Stop() { s.stop() }
