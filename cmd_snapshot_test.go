package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/format"
	"github.com/uffdrestore/uffdrestore/internal/testutil"
	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/snapshot"
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
		code, _, stderr := runSnapCLI(t, "snapshot", "create", "--from-file", raw, "-o", snap, "--codec", codec, "--chunk-size", "256KiB", "--workers", "2", "--force")
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
		code, _, stderr = runSnapCLI(t, "snapshot", "extract", snap, "--output", back, "--region", "img.raw", "--force")
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

// snapSidecar writes a sidecar profile of the snapshot at snap.
func snapSidecar(t *testing.T, snap, file, name string, chunks ...uint32) format.Profile {
	t.Helper()
	f, err := format.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := format.Profile{Name: name}
	for i, c := range chunks {
		p.Entries = append(p.Entries, format.ProfileEntry{Chunk: c, Rank: uint32(i), TimeNS: uint64(1000 * (i + 1))})
	}
	if err := restore.SaveProfile(file, f.Reader, p); err != nil {
		t.Fatal(err)
	}
	return p
}

func snapProfiles(t *testing.T, snap string) []format.Profile {
	t.Helper()
	f, err := format.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return f.Profiles()
}

func snapMustRun(t *testing.T, args ...string) (string, string) {
	t.Helper()
	code, out, stderr := runSnapCLI(t, args...)
	if code != 0 {
		t.Fatalf("%q: exit %d: %s", args, code, stderr)
	}
	return out, stderr
}

// snapMakeTestSnap writes snapTestImage as a 64 KiB-chunk snapshot.
func snapMakeTestSnap(t *testing.T, dir string) (raw, snap string, img []byte) {
	img = snapTestImage()
	raw = filepath.Join(dir, "img.raw")
	if err := os.WriteFile(raw, img, 0o644); err != nil {
		t.Fatal(err)
	}
	snap = filepath.Join(dir, "img.snap")
	snapMustRun(t, "snapshot", "create", "-q", "--from-file", raw, "-o", snap, "--chunk-size", "64K", "--codec", "s2")
	return raw, snap, img
}

func TestSnapshotProfileCLI(t *testing.T) {
	dir := t.TempDir()
	_, snap, _ := snapMakeTestSnap(t, dir)
	if out, _ := snapMustRun(t, "snapshot", "profile", "list", snap); !strings.Contains(out, "no working-set profiles") {
		t.Errorf("list of none: %q", out)
	}
	run1 := snapSidecar(t, snap, filepath.Join(dir, "run1.json"), "run1", 40, 3, 77, 12)
	run2 := snapSidecar(t, snap, filepath.Join(dir, "run2.json"), "whatever", 3, 50, 40)

	snapMustRun(t, "snapshot", "profile", "add", snap, "--from", filepath.Join(dir, "run1.json"))
	snapMustRun(t, "snapshot", "profile", "add", snap, "--from", filepath.Join(dir, "run2.json"), "--name", "run2")
	code, _, stderr := runSnapCLI(t, "snapshot", "profile", "add", snap, "--from", filepath.Join(dir, "run2.json"), "--name", "run1")
	if code != 1 || !strings.Contains(stderr, `already has a profile "run1"`) {
		t.Errorf("duplicate name: exit %d, %q", code, stderr)
	}
	ps := snapProfiles(t, snap)
	if len(ps) != 2 || ps[0].Name != "run1" || ps[1].Name != "run2" || !slices.Equal(ps[1].Entries, run2.Entries) {
		t.Fatalf("profiles after add: %v", ps)
	}

	// A sidecar of another snapshot is rejected, naming both identities.
	other := filepath.Join(dir, "other.snap")
	snapMustRun(t, "snapshot", "create", "-q", "--from-file", filepath.Join(dir, "img.raw"), "-o", other, "--chunk-size", "128K")
	snapSidecar(t, other, filepath.Join(dir, "foreign.json"), "foreign", 1, 2)
	for _, args := range [][]string{
		{"snapshot", "profile", "add", snap, "--from", filepath.Join(dir, "foreign.json")},
		{"snapshot", "profile", "merge", snap, "--name", "m", "--from-file", filepath.Join(dir, "foreign.json")},
		{"snapshot", "reorder", snap, "-o", filepath.Join(dir, "x.snap"), "--profile-file", filepath.Join(dir, "foreign.json")},
	} {
		code, _, stderr := runSnapCLI(t, args...)
		if code != 1 || !strings.Contains(stderr, "foreign.json is a foreign profile: recorded on snapshot") {
			t.Errorf("%q: exit %d, %q; want a foreign-profile error", args[2], code, stderr)
		}
	}
	// A sidecar of this snapshot naming chunks beyond it (damaged or
	// edited) is rejected by the same check a restore makes.
	snapSidecar(t, snap, filepath.Join(dir, "damaged.json"), "damaged", 1, 1<<20)
	for _, args := range [][]string{
		{"snapshot", "profile", "add", snap, "--from", filepath.Join(dir, "damaged.json")},
		{"snapshot", "reorder", snap, "-o", filepath.Join(dir, "x.snap"), "--profile-file", filepath.Join(dir, "damaged.json")},
	} {
		code, _, stderr := runSnapCLI(t, args...)
		if code != 1 || !strings.Contains(stderr, "1 of 2 entries name chunks beyond the snapshot") {
			t.Errorf("%q: exit %d, %q; want an out-of-range error", args[2], code, stderr)
		}
	}
	if len(snapProfiles(t, snap)) != 2 {
		t.Error("a rejected profile changed the snapshot")
	}

	// Merge stored and sidecar profiles.
	snapMustRun(t, "snapshot", "profile", "merge", snap, "--name", "boot", "--from", "run1,run2", "--from-file", filepath.Join(dir, "run1.json"))
	ps = snapProfiles(t, snap)
	want := restore.MergeProfiles("boot", run1, run2, run1)
	if len(ps) != 3 || ps[2].Name != "boot" || !slices.Equal(ps[2].Entries, want.Entries) {
		t.Fatalf("merged: %v, want %v", ps[len(ps)-1], want)
	}
	code, _, stderr = runSnapCLI(t, "snapshot", "profile", "merge", snap, "--name", "boot", "--from", "run1,nope")
	if code != 1 || !strings.Contains(stderr, `no profile "nope"`) {
		t.Errorf("merge of a missing profile: exit %d, %q", code, stderr)
	}
	snapMustRun(t, "snapshot", "profile", "merge", snap, "--name", "boot", "--replace") // all stored profiles

	// List, text and JSON: entries, units covered, timestamps.
	out, _ := snapMustRun(t, "snapshot", "profile", "list", snap, "--json", "--unit", "chunk")
	var infos []snapshot.ProfileInfo
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(infos) != 3 || infos[0].Name != "run1" || infos[0].Entries != 4 || infos[0].Units != 4 || infos[0].UnitSize != 64<<10 ||
		infos[0].FirstNS != 1000 || infos[0].LastNS != 4000 || infos[2].Name != "boot" || infos[2].Chunks != 5 {
		t.Errorf("list json: %+v", infos)
	}
	out, _ = snapMustRun(t, "snapshot", "profile", "list", snap)
	if !strings.Contains(out, `"run1"`) || !strings.Contains(out, "UNITS") || !strings.Contains(out, "4µs") {
		t.Errorf("list text:\n%s", out)
	}
	out, _ = snapMustRun(t, "snapshot", "info", snap)
	if !strings.Contains(out, "profile:         run1: 4 entries, 4 chunks (256.0 KiB), 3 units of 2.0 MiB") {
		t.Errorf("info text:\n%s", out)
	}
	out, _ = snapMustRun(t, "snapshot", "info", snap, "--json")
	var rep snapshot.InfoReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil || len(rep.Profiles) != 3 || rep.Profiles[0].Units != 3 || rep.Profiles[0].Entries != 4 || !rep.ChunkOrder {
		t.Errorf("info json: %v %+v", err, rep.Profiles)
	}

	// Export: a sidecar of this snapshot with the same entries.
	exp := filepath.Join(dir, "boot.json")
	snapMustRun(t, "snapshot", "profile", "export", snap, "--name", "boot", "-o", exp)
	sc, err := restore.LoadProfile(exp)
	if err != nil {
		t.Fatal(err)
	}
	f, _ := format.Open(snap)
	id := restore.SnapshotID(f.Reader)
	f.Close()
	if sc.SnapshotID != id || sc.Profile.Name != "boot" || !slices.Equal(sc.Profile.Entries, snapProfiles(t, snap)[2].Entries) {
		t.Errorf("exported %+v", sc)
	}
	if code, _, stderr := runSnapCLI(t, "snapshot", "profile", "export", snap, "-o", exp, "--force"); code != 2 || !strings.Contains(stderr, "choose one with --name") {
		t.Errorf("export without --name: exit %d, %q", code, stderr)
	}

	// Remove.
	snapMustRun(t, "snapshot", "profile", "remove", snap, "--name", "run1")
	if ps := snapProfiles(t, snap); len(ps) != 2 || ps[0].Name != "run2" {
		t.Errorf("after remove: %v", ps)
	}
	if code, _, stderr := runSnapCLI(t, "snapshot", "profile", "remove", snap, "--name", "run1"); code != 1 || !strings.Contains(stderr, `no profile "run1"`) {
		t.Errorf("remove again: exit %d, %q", code, stderr)
	}
	// The chunk data was never touched: verify passes.
	if out, _ := snapMustRun(t, "snapshot", "verify", snap); !strings.HasPrefix(out, "ok: ") {
		t.Errorf("verify: %s", out)
	}
}

// snapCheckWorkingSetFirst checks that the stored bytes of chunks lie back
// to back at the start of the data area, in that order.
func snapCheckWorkingSetFirst(t *testing.T, snap string, chunks []uint32) {
	t.Helper()
	f, err := format.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	at := uint64(format.HeaderSize)
	for _, c := range chunks {
		ch := f.Chunk(int(c))
		if ch.Codec == format.CodecZero {
			continue
		}
		if ch.Offset != at {
			t.Fatalf("%s: chunk %d at %#x, want %#x: the working set is not contiguous at the start", filepath.Base(snap), c, ch.Offset, at)
		}
		at += uint64(ch.StoredLen)
	}
}

func snapExtractEqual(t *testing.T, snap string, img []byte) {
	t.Helper()
	back := snap + ".raw"
	snapMustRun(t, "snapshot", "extract", snap, "-o", back)
	if got, _ := os.ReadFile(back); !bytes.Equal(got, img) {
		t.Fatalf("%s extracts to different bytes", filepath.Base(snap))
	}
	os.Remove(back)
	if out, _ := snapMustRun(t, "snapshot", "verify", snap); !strings.HasPrefix(out, "ok: ") {
		t.Fatalf("verify %s: %s", snap, out)
	}
}

func TestSnapshotReorderCLI(t *testing.T) {
	dir := t.TempDir()
	raw, snap, img := snapMakeTestSnap(t, dir)
	// Chunk i is zero when (i/4)%3 == 0: chunk 3 is zero, the others are not.
	snapSidecar(t, snap, filepath.Join(dir, "boot.json"), "boot", 70, 5, 41, 22, 3)
	snapMustRun(t, "snapshot", "profile", "add", snap, "--from", filepath.Join(dir, "boot.json"))
	f, _ := format.Open(snap)
	id := restore.SnapshotID(f.Reader)
	f.Close()

	// Chunk by chunk: exactly the profile's chunks, in rank order.
	re := filepath.Join(dir, "re.snap")
	_, stderr := snapMustRun(t, "snapshot", "reorder", snap, "--profile", "boot", "-o", re, "--unit", "chunk")
	if !strings.Contains(stderr, `working set of profile "boot" first (4 of`) {
		t.Errorf("summary: %q", stderr)
	}
	snapExtractEqual(t, re, img)
	snapCheckWorkingSetFirst(t, re, []uint32{70, 5, 41, 22, 3})
	out, _ := snapMustRun(t, "snapshot", "info", re)
	if !strings.Contains(out, "reordered") || !strings.Contains(out, "profile:         boot: 5 entries") {
		t.Errorf("info of the reordered snapshot:\n%s", out)
	}
	f, _ = format.Open(re)
	if restore.SnapshotID(f.Reader) != id {
		t.Error("reordering changed the snapshot identity")
	}
	f.Close()

	// 2 MiB units (the default): units 2, 0, 1 whole, each in chunk order.
	var units []uint32
	for _, u := range []uint32{2, 0, 1} {
		for c := u * 32; c < min((u+1)*32, 81); c++ { // 81 chunks
			units = append(units, c)
		}
	}
	snapMustRun(t, "snapshot", "reorder", snap, "-o", re, "--force") // the only profile
	snapCheckWorkingSetFirst(t, re, units)
	snapExtractEqual(t, re, img)

	// A sidecar: checked, used, and stored in the output. In place.
	snapSidecar(t, snap, filepath.Join(dir, "late.json"), "late", 79, 78)
	in := filepath.Join(dir, "inplace.snap")
	b, _ := os.ReadFile(snap)
	os.WriteFile(in, b, 0o644)
	snapMustRun(t, "snapshot", "reorder", in, "--profile-file", filepath.Join(dir, "late.json"), "-o", in, "--unit", "64K", "--force")
	snapCheckWorkingSetFirst(t, in, []uint32{79, 78})
	snapExtractEqual(t, in, img)
	if ps := snapProfiles(t, in); len(ps) != 2 || ps[0].Name != "boot" || ps[1].Name != "late" {
		t.Errorf("profiles after reorder with a sidecar: %v", ps)
	}

	// create --reorder-profile: the same image gives the same identity.
	cr := filepath.Join(dir, "cr.snap")
	_, stderr = snapMustRun(t, "snapshot", "create", "--from-file", raw, "-o", cr, "--chunk-size", "64K", "--codec", "s2",
		"--reorder-profile", filepath.Join(dir, "boot.json"), "--reorder-unit", "chunk")
	if !strings.Contains(stderr, `reordered: working set of profile "boot" first (4 chunks`) {
		t.Errorf("create summary: %q", stderr)
	}
	snapCheckWorkingSetFirst(t, cr, []uint32{70, 5, 41, 22, 3})
	snapExtractEqual(t, cr, img)
	if ps := snapProfiles(t, cr); len(ps) != 1 || ps[0].Name != "boot" {
		t.Errorf("create --reorder-profile stored %v", ps)
	}
	// ... but another chunk size is another snapshot: a warning, chunk order.
	_, stderr = snapMustRun(t, "snapshot", "create", "--from-file", raw, "-o", cr, "--chunk-size", "128K", "--force",
		"--reorder-profile", filepath.Join(dir, "boot.json"))
	if !strings.Contains(stderr, "is a foreign profile") || !strings.Contains(stderr, "chunk data left in chunk order") {
		t.Errorf("create with a foreign profile: %q", stderr)
	}
	f, _ = format.Open(cr)
	if !snapshot.InChunkOrder(f.Reader) || len(f.Profiles()) != 0 {
		t.Error("a foreign profile reordered the data or was stored")
	}
	f.Close()
	snapExtractEqual(t, cr, img)
	// ... and so is a sidecar of this snapshot naming chunks beyond it
	// (damaged): it is not trimmed and half used.
	snapSidecar(t, snap, filepath.Join(dir, "damaged.json"), "damaged", 70, 1<<20)
	_, stderr = snapMustRun(t, "snapshot", "create", "--from-file", raw, "-o", cr, "--chunk-size", "64K", "--codec", "s2", "--force",
		"--reorder-profile", filepath.Join(dir, "damaged.json"))
	if !strings.Contains(stderr, "1 of 2 entries name chunks beyond the snapshot") || !strings.Contains(stderr, "chunk data left in chunk order") {
		t.Errorf("create with a damaged profile: %q", stderr)
	}
	f, _ = format.Open(cr)
	if !snapshot.InChunkOrder(f.Reader) || len(f.Profiles()) != 0 {
		t.Error("a damaged profile reordered the data or was stored")
	}
	f.Close()

	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"snapshot", "reorder", snap}, 2, "--output SNAP is required"},
		{[]string{"snapshot", "reorder", snap, "-o", re, "--profile", "a", "--profile-file", "b"}, 2, "not both"},
		{[]string{"snapshot", "reorder", snap, "-o", re, "--unit", "3K"}, 2, "power of two"},
		{[]string{"snapshot", "reorder", snap, "-o", re, "--profile", "nope"}, 1, `no profile "nope" in the snapshot (it has "boot")`},
		{[]string{"snapshot", "reorder", raw, "-o", re}, 1, "not a uffdrestore snapshot"},
		{[]string{"snapshot", "create", "--from-file", raw, "-o", "-", "--reorder-profile", "x"}, 2, "needs a file --output"},
		{[]string{"snapshot", "create", "--from-file", raw, "-o", cr, "--reorder-profile", filepath.Join(dir, "missing.json")}, 1, "no such file"},
	} {
		code, _, stderr := runSnapCLI(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("%q: exit %d, %q; want exit %d containing %q", c.args, code, stderr, c.code, c.want)
		}
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp") {
			t.Errorf("temporary file left: %s", e.Name())
		}
	}
}

// TestReorderPrefetchReads: the restore engine prefetches a reordered
// snapshot's working set with one coalesced read, where the chunk-ordered
// original needs one read per chunk.
func TestReorderPrefetchReads(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	img := make([]byte, 24<<20) // 96 chunks of 256 KiB, none zero
	for i := range img {
		img[i] = byte(i>>10) ^ byte(i*13)
	}
	raw := filepath.Join(dir, "img.raw")
	if err := os.WriteFile(raw, img, 0o644); err != nil {
		t.Fatal(err)
	}
	snap := filepath.Join(dir, "img.snap")
	snapMustRun(t, "snapshot", "create", "-q", "--from-file", raw, "-o", snap, "--chunk-size", "256K", "--codec", "s2")
	ws := []uint32{90, 7, 55, 23, 71, 2, 40, 64, 15, 88, 31, 49}
	snapSidecar(t, snap, filepath.Join(dir, "boot.json"), "boot", ws...)
	snapMustRun(t, "snapshot", "profile", "add", snap, "--from", filepath.Join(dir, "boot.json"))
	re := filepath.Join(dir, "re.snap")
	snapMustRun(t, "snapshot", "reorder", snap, "--profile", "boot", "-o", re, "--unit", "chunk")
	snapCheckWorkingSetFirst(t, re, ws)

	reads := func(path string) int64 {
		l, err := restore.NewLoader(context.Background(), path, restore.WithBacking(restore.BackingShmem), restore.WithWorkers(1),
			restore.WithProfile(restore.ProfileSource{Name: "boot"}))
		if err != nil {
			testutil.Skip(t, "restore engine unavailable here: %v", err)
		}
		defer l.Close()
		deadline := time.Now().Add(10 * time.Second)
		for {
			s := l.Stats()
			if s.WorkingSet != nil && s.WorkingSet.Prefilled+s.WorkingSet.Late >= int64(len(ws)) {
				if s.UnitsPresent != int64(len(ws)) {
					t.Fatalf("%s: %d units present, want the working set's %d", filepath.Base(path), s.UnitsPresent, len(ws))
				}
				return s.Reads
			}
			if err := l.Err(); err != nil {
				t.Fatal(err)
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: working set not prefetched in 10 s: %+v", filepath.Base(path), s.WorkingSet)
			}
			time.Sleep(time.Millisecond)
		}
	}
	orig, reord := reads(snap), reads(re)
	t.Logf("working set of %d chunks prefetched with %d preads (chunk order), %d (reordered)", len(ws), orig, reord)
	if reord != 1 || orig < int64(len(ws))/2 {
		t.Errorf("preads: %d for the original, %d for the reordered snapshot; want many, then 1", orig, reord)
	}
}
