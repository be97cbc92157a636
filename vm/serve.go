package vm

import (
	"context"
	"fmt"
	"time"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/attach"
)

// Server serves a VM snapshot's RAM in-process, as `uffdrestore load` does:
// any number of restored VMs (private clones) attach to it and share one
// fill.
type Server struct {
	Loader *restore.Loader
	srv    *attach.Server
	path   string
}

// Serve loads the snapshot's index (lazily: no RAM is decoded before a
// fault asks) and serves it on the Unix socket sock.
func Serve(ctx context.Context, snap, sock string, logf func(string, ...any), opts ...restore.Option) (*Server, error) {
	f, err := format.Open(snap)
	if err != nil {
		return nil, err
	}
	_, ok := f.Attachment(format.AttachQEMUDeviceState)
	f.Close()
	if !ok {
		return nil, fmt.Errorf("%w: %s holds memory only; make VM snapshots with uffdrestore vm checkpoint", ErrNoDeviceState, snap)
	}
	if err := attach.PrepareSocket(sock); err != nil {
		return nil, err
	}
	all := append([]restore.Option{restore.WithMode(restore.ModeLazy), restore.ForTargets()}, opts...)
	l, err := restore.NewLoader(ctx, snap, all...)
	if err != nil {
		return nil, err
	}
	if logf == nil {
		logf = func(string, ...any) {}
	}
	s, err := attach.Listen(sock, attach.FromLoader(l), attach.Options{Logf: logf})
	if err != nil {
		l.Close()
		return nil, err
	}
	return &Server{Loader: l, srv: s, path: sock}, nil
}

// Path is the server's socket.
func (s *Server) Path() string { return s.path }

// Stats are the loader's statistics (units decoded, faults...).
func (s *Server) Stats() restore.Stats { return s.Loader.Stats() }

// Close stops serving (detaching whatever is still attached after 5 s) and
// frees the backing.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.srv.Shutdown(ctx)
	return s.Loader.Close()
}
