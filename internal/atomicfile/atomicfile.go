// Package atomicfile writes a file so that readers see either the old
// content or the complete new one, never a part, and so that the new content
// survives a crash once Commit returns.
//
// The data goes to a temporary file with a unique name in the destination's
// directory (so concurrent writers of one path never share a temporary, and
// the rename stays within one file system). Commit flushes it to disk
// (fsync), renames it over the destination and flushes the directory; every
// failure, and Abort, removes the temporary. rename(2) replaces whatever is
// at the destination: a symbolic link there is replaced by the file, not
// followed, so a link can never redirect the write elsewhere.
package atomicfile

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// File is a file being written in place of a destination path. Nothing
// appears at the destination until Commit.
type File struct {
	f    *os.File
	bw   *bufio.Writer // Write buffers; everything else flushes it first
	path string
	perm os.FileMode
	done bool
}

// syncFile and syncDir flush to disk; tests replace them to reach the
// failure paths.
var (
	syncFile = (*os.File).Sync
	syncDir  = func(dir string) error {
		d, err := os.Open(dir)
		if err != nil {
			return err
		}
		err = d.Sync()
		if cerr := d.Close(); err == nil {
			err = cerr
		}
		return err
	}
)

// Create starts writing path, which gets mode perm on Commit (exactly perm:
// the umask does not apply). A directory at path is refused.
func Create(path string, perm os.FileMode) (*File, error) {
	if st, err := os.Lstat(path); err == nil && st.IsDir() {
		return nil, fmt.Errorf("write %s: it is a directory: give a file name", path)
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("write %s: %w (does the directory exist and is it writable?)", path, err)
	}
	return &File{f: f, bw: bufio.NewWriterSize(f, 1<<20), path: path, perm: perm}, nil
}

// Write appends to the temporary file, buffered.
func (a *File) Write(p []byte) (int, error) { return a.bw.Write(p) }

// Flush writes out what Write buffered.
func (a *File) Flush() error { return a.bw.Flush() }

// WriteAt writes to the temporary file at off (after flushing what Write
// buffered). Once nothing is buffered, WriteAt and ReadAt may be called
// from several goroutines at once.
func (a *File) WriteAt(p []byte, off int64) (int, error) {
	if err := a.bw.Flush(); err != nil {
		return 0, err
	}
	return a.f.WriteAt(p, off)
}

// ReadAt reads back what was written so far.
func (a *File) ReadAt(p []byte, off int64) (int, error) {
	if err := a.bw.Flush(); err != nil {
		return 0, err
	}
	return a.f.ReadAt(p, off)
}

// Truncate sets the temporary file's size.
func (a *File) Truncate(size int64) error {
	if err := a.bw.Flush(); err != nil {
		return err
	}
	return a.f.Truncate(size)
}

// Size is the temporary file's current size, with what Write buffered.
func (a *File) Size() (int64, error) {
	if err := a.bw.Flush(); err != nil {
		return 0, err
	}
	st, err := a.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// Name is the temporary file's path (for messages).
func (a *File) Name() string { return a.f.Name() }

// Path is the destination.
func (a *File) Path() string { return a.path }

// Commit makes the written content the destination's, durably. On any
// error the temporary file is removed and the destination is left as it
// was (unless only the final directory flush failed: then the new content
// is in place but may not survive a crash, and the error says so).
func (a *File) Commit() error {
	if a.done {
		return fmt.Errorf("write %s: %w", a.path, os.ErrClosed)
	}
	a.done = true
	err := a.bw.Flush()
	if err == nil {
		err = a.f.Chmod(a.perm)
	}
	if err == nil {
		err = syncFile(a.f)
	}
	if cerr := a.f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(a.f.Name(), a.path)
	}
	if err != nil {
		os.Remove(a.f.Name())
		return fmt.Errorf("write %s: %w", a.path, err)
	}
	if err := syncDir(filepath.Dir(a.path)); err != nil {
		return fmt.Errorf("write %s: written, but flushing its directory failed (it may not survive a crash): %w", a.path, err)
	}
	return nil
}

// Abort discards the temporary file. It does nothing after Commit or a
// first Abort, so it can be deferred.
func (a *File) Abort() {
	if a.done {
		return
	}
	a.done = true
	a.f.Close()
	os.Remove(a.f.Name())
}

// WriteFile writes path atomically with write; perm as for Create.
func WriteFile(path string, perm os.FileMode, write func(io.Writer) error) error {
	a, err := Create(path, perm)
	if err != nil {
		return err
	}
	if err := write(a); err != nil {
		a.Abort()
		return err
	}
	return a.Commit()
}

// WriteBytes writes b to path atomically; perm as for Create.
func WriteBytes(path string, perm os.FileMode, b []byte) error {
	return WriteFile(path, perm, func(w io.Writer) error {
		_, err := w.Write(b)
		return err
	})
}
