package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/format"
)

// runSnapCLI runs the app like main does (with reorderArgs) and returns the
// exit status and outputs.
func runSnapCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	app := newApp()
	app.Commands = snapCloneCommands(app.Commands) // Run mutates commands; keep the globals clean
	var stdout, stderr bytes.Buffer
	app.Writer, app.ErrWriter = &stdout, &stderr
	app.ExitErrHandler = func(*cli.Context, error) {}
	err := app.Run(reorderArgs(app, append([]string{"uffdrestore"}, args...)))
	code := 0
	if err != nil {
		code = 1
		if ec, ok := err.(cli.ExitCoder); ok {
			code = ec.ExitCode()
		}
		stderr.WriteString(err.Error())
	}
	return code, stdout.String(), stderr.String()
}

func snapCloneCommands(cs []*cli.Command) []*cli.Command {
	out := make([]*cli.Command, len(cs))
	for i, c := range cs {
		cc := *c
		cc.Subcommands = snapCloneCommands(c.Subcommands)
		out[i] = &cc
	}
	return out
}

func snapTestImage() []byte {
	img := make([]byte, 5<<20+4097)
	for i := range img {
		if (i>>18)%3 != 0 {
			img[i] = byte(i*7) ^ byte(i>>9)
		}
	}
	return img
}

func TestSnapshotCLIRoundTrip(t *testing.T) {
	dir := t.TempDir()
	img := snapTestImage()
	raw := filepath.Join(dir, "img.raw")
	if err := os.WriteFile(raw, img, 0o644); err != nil {
		t.Fatal(err)
	}
	snap := filepath.Join(dir, "img.snap")
	for _, codec := range []string{"zstd", "s2", "none"} {
		// Flags after the positional-free command, mixed forms.
		code, _, stderr := runSnapCLI(t, "snapshot", "create", "--from-file", raw, "-o", snap, "--codec", codec, "--chunk-size", "256KiB", "--workers", "2")
		if code != 0 {
			t.Fatalf("create %s: exit %d: %s", codec, code, stderr)
		}
		if !strings.Contains(stderr, "wrote "+snap) {
			t.Errorf("create summary missing: %q", stderr)
		}
		// Flag after the positional argument.
		code, out, stderr := runSnapCLI(t, "snapshot", "info", snap, "--json")
		if code != 0 {
			t.Fatalf("info: exit %d: %s", code, stderr)
		}
		var rep struct {
			ChunkSize int            `json:"chunk_size"`
			RawBytes  uint64         `json:"raw_bytes"`
			Codecs    map[string]int `json:"codecs"`
		}
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("info json: %v\n%s", err, out)
		}
		if rep.ChunkSize != 256<<10 || rep.RawBytes != uint64(len(img)) || rep.Codecs["zero"] == 0 {
			t.Errorf("info %+v", rep)
		}
		code, out, stderr = runSnapCLI(t, "snapshot", "verify", snap, "--workers", "2")
		if code != 0 || !strings.HasPrefix(out, "ok: 21 chunks verified") {
			t.Fatalf("verify: exit %d: %s %s", code, out, stderr)
		}
		back := filepath.Join(dir, "back.raw")
		code, _, stderr = runSnapCLI(t, "snapshot", "extract", snap, "--output", back, "--region", "img.raw")
		if code != 0 {
			t.Fatalf("extract: exit %d: %s", code, stderr)
		}
		if got, _ := os.ReadFile(back); !bytes.Equal(got, img) {
			t.Fatalf("%s: extracted image differs", codec)
		}
	}
	code, out, _ := runSnapCLI(t, "snapshot", "info", snap)
	if code != 0 || !strings.Contains(out, "chunk size:      256.0 KiB") || !strings.Contains(out, "img.raw") {
		t.Errorf("info text: %d %s", code, out)
	}
	// No temporary files left behind.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file left: %s", e.Name())
		}
	}
}

func TestSnapshotCLIVerifyBad(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "img.raw")
	os.WriteFile(raw, snapTestImage(), 0o644)
	snap := filepath.Join(dir, "img.snap")
	if code, _, stderr := runSnapCLI(t, "snapshot", "create", "--quiet", "--from-file", raw, "-o", snap, "--chunk-size", "64K"); code != 0 {
		t.Fatal(stderr)
	}
	f, err := format.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	var bad []int
	for i := 0; i < f.NumChunks() && len(bad) < 2; i++ {
		if f.Chunk(i).StoredLen > 0 && i%5 == 1 {
			bad = append(bad, i)
		}
	}
	b, _ := os.ReadFile(snap)
	for _, i := range bad {
		c := f.Chunk(i)
		b[c.Offset+uint64(c.StoredLen)/2] ^= 0xFF
	}
	f.Close()
	os.WriteFile(snap, b, 0o644)
	code, out, stderr := runSnapCLI(t, "snapshot", "verify", snap)
	if code != 1 {
		t.Fatalf("verify of a damaged file: exit %d", code)
	}
	for _, i := range bad {
		if !strings.Contains(out, "bad chunk "+itoa(i)+": region 0 \"img.raw\"") {
			t.Errorf("output does not name chunk %d:\n%s", i, out)
		}
	}
	if !strings.Contains(stderr, "2 of") {
		t.Errorf("stderr %q", stderr)
	}
	// A damaged index: NewReader fails naming the field.
	b[len(b)-40] ^= 1
	os.WriteFile(snap, b, 0o644)
	code, _, stderr = runSnapCLI(t, "snapshot", "verify", snap)
	if code != 1 || !strings.Contains(stderr, "index") || !strings.Contains(stderr, "checksum mismatch") {
		t.Errorf("damaged index: exit %d, %q", code, stderr)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestSnapshotCLIErrors(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "img.raw")
	os.WriteFile(raw, []byte("hello"), 0o644)
	out := filepath.Join(dir, "o.snap")
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"snapshot", "create", "--from-file", raw}, 2, "--output SNAP is required"},
		{[]string{"snapshot", "create", "-o", out}, 2, "exactly one of --from-file"},
		{[]string{"snapshot", "create", "-o", out, "--from-file", raw, "--from-pid", "1"}, 2, "exactly one of"},
		{[]string{"snapshot", "create", "-o", out, "--from-file", raw, "--chunk-size", "100K"}, 2, "power of two"},
		{[]string{"snapshot", "create", "-o", out, "--from-file", raw, "--chunk-size", "lots"}, 2, "bad size"},
		{[]string{"snapshot", "create", "-o", out, "--from-file", raw, "--codec", "lz4"}, 2, "zstd, s2 or none"},
		{[]string{"snapshot", "create", "-o", out, "--from-file", filepath.Join(dir, "missing")}, 1, "no such file"},
		{[]string{"snapshot", "create", "-o", out, "--from-pid", "999999999"}, 1, "is the process running"},
		{[]string{"snapshot", "info", raw}, 1, "not a uffdrestore snapshot"},
		{[]string{"snapshot", "info"}, 2, "exactly one snapshot file"},
		{[]string{"snapshot", "extract", raw}, 2, "--output IMAGE is required"},
	}
	for _, c := range cases {
		code, _, stderr := runSnapCLI(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d containing %q", c.args, code, stderr, c.code, c.want)
		}
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Error("failed create left an output file")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("files left behind: %v", ents)
	}
}

func TestSnapParseSize(t *testing.T) {
	for in, want := range map[string]int64{"65536": 65536, "64K": 64 << 10, "256KiB": 256 << 10, "2M": 2 << 20, "2MiB": 2 << 20, "2m": 2 << 20, "1G": 1 << 30, "64kb": 64 << 10} {
		if got, err := snapParseSize(in); err != nil || got != want {
			t.Errorf("snapParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "x", "-1", "1.5M", "9999999999999999999G"} {
		if _, err := snapParseSize(in); err == nil {
			t.Errorf("snapParseSize(%q) accepted", in)
		}
	}
}
