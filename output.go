package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"
)

// forceFlag is the --force of every command that writes a file: without it
// an existing output is never replaced (as zstd and gzip do).
func forceFlag() cli.Flag {
	return &cli.BoolFlag{Name: "force", Aliases: []string{"f"}, Usage: "replace an existing output file"}
}

// outputCheck describes one output of a command: the flag that names it, the
// path ("-" for stdout, "" for none) and the files the command reads.
type outputCheck struct {
	flag   string // e.g. "--output"
	path   string
	inputs []string // paths read by the command; "-" is stdin
	// sameOK allows the output to be an input when force is given (an
	// atomic in-place rewrite that keeps every byte, as reorder does).
	sameOK bool
}

// checkOutput refuses, before any work is done:
//   - an output that is one of the inputs: the same file whatever the path
//     spelling (./x, a symlink, a hard link, stdin or stdout redirected to it);
//   - an existing output, unless force;
//   - an output whose directory does not exist or cannot be written (so a
//     long run does not fail only at its end).
func checkOutput(o outputCheck, force bool) (msg string, code int) {
	if o.path == "" {
		return "", 0
	}
	var out fs.FileInfo
	var err error
	if o.path == "-" {
		out, err = os.Stdout.Stat()
		if err != nil || !out.Mode().IsRegular() {
			return "", 0 // a terminal or a pipe cannot be an input file
		}
	} else {
		out, err = os.Stat(o.path)
	}
	if err == nil {
		for _, in := range o.inputs {
			if in == "" {
				continue
			}
			var st fs.FileInfo
			var serr error
			if in == "-" {
				st, serr = os.Stdin.Stat()
			} else {
				st, serr = os.Stat(in)
			}
			if serr != nil || !os.SameFile(out, st) {
				continue
			}
			if o.sameOK && force {
				return "", 0
			}
			what := "output " + o.path
			if o.path == "-" {
				what = "standard output"
			}
			src := in
			if in == "-" {
				src = "standard input"
			}
			if o.sameOK {
				return fmt.Sprintf("%s: %s is the input %s (the same file): give --force to rewrite it in place, or write to another file", o.flag, what, src), 2
			}
			return fmt.Sprintf("%s: %s is the input %s (the same file): writing it would destroy the input; write to another file", o.flag, what, src), 2
		}
		if o.path == "-" {
			return "", 0
		}
		if out.IsDir() {
			return fmt.Sprintf("%s %s is a directory: give a file name", o.flag, o.path), 2
		}
		if !force {
			return fmt.Sprintf("%s %s already exists: give --force to replace it, or write to another file", o.flag, o.path), 1
		}
		return "", 0
	}
	if o.path == "-" {
		return "", 0
	}
	if _, lerr := os.Lstat(o.path); lerr == nil && !force {
		// A dangling symlink: replacing it would lose it.
		return fmt.Sprintf("%s %s already exists (a symlink to a missing file): give --force to replace it, or write to another file", o.flag, o.path), 1
	}
	dir := filepath.Dir(o.path)
	f, err := os.CreateTemp(dir, ".uffdrestore-check-*")
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Sprintf("%s %s: directory %s does not exist: create it (mkdir -p %s) or write elsewhere", o.flag, o.path, dir, dir), 1
		}
		return fmt.Sprintf("%s %s: cannot write in %s: %v", o.flag, o.path, dir, err), 1
	}
	f.Close()
	os.Remove(f.Name())
	return "", 0
}

// checkOutputs runs checkOutput on each output of command cmd; the error
// exits 2 for a usage error, 1 for a refusal.
func checkOutputs(cmd string, force bool, outs ...outputCheck) error {
	for _, o := range outs {
		if msg, code := checkOutput(o, force); msg != "" {
			return cli.Exit(cmd+": "+msg, code)
		}
	}
	return nil
}
