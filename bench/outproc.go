package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"github.com/uffdrestore/uffdrestore/restore"
	"github.com/uffdrestore/uffdrestore/restore/attach"
	"golang.org/x/sys/unix"
)

// targetOutput is the JSON line bin/uffdrestore-target prints.
type targetOutput struct {
	ReadyMS     float64 `json:"ready_ms"`
	FirstByteMS float64 `json:"first_byte_ms"`
	TouchMS     float64 `json:"touch_ms"`
	Pages       int64   `json:"pages"`
	PageSize    int64   `json:"page_size"`
	Threads     int     `json:"threads"`
	Lat         struct {
		P50 float64 `json:"p50"`
		P90 float64 `json:"p90"`
		P99 float64 `json:"p99"`
		Max float64 `json:"max"`
	} `json:"lat_us"`
	Bytes uint64 `json:"bytes"`
}

// FindTarget returns the example target: $UFFDRESTORE_TARGET, bin/ beside
// the running executable or in the working directory (or its parents, for
// tests), or "" if there is none.
func FindTarget() string {
	if p := os.Getenv("UFFDRESTORE_TARGET"); p != "" {
		return p
	}
	var cands []string
	if exe, err := os.Executable(); err == nil {
		cands = append(cands, filepath.Join(filepath.Dir(exe), "uffdrestore-target"))
	}
	if wd, err := os.Getwd(); err == nil {
		for d := wd; ; d = filepath.Dir(d) {
			cands = append(cands, filepath.Join(d, "bin", "uffdrestore-target"))
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	for _, c := range cands {
		if st, err := os.Stat(c); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return c
		}
	}
	return ""
}

// runOutOfProcess loads the snapshot with a restore.Loader in this process,
// serves it on an attach socket, and runs the example C target with the
// pattern. Clock: t0 before NewLoader; ready = the target attached; first
// byte and complete from the target's own figures (it counts from its
// start, which is placed on our clock when it is started).
func runOutOfProcess(ctx context.Context, env *Env, mode string, p Pattern, threads int, target string, seed uint64) RunResult {
	res := RunResult{Metrics: map[string]float64{}}
	fail := func(err error) RunResult { res.Error = err.Error(); return res }
	md, err := restore.ParseMode(mode)
	if err != nil {
		return fail(err)
	}
	dir, err := os.MkdirTemp("", "uffdrestore-bench-oop")
	if err != nil {
		return fail(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "sock")
	args := []string{"--socket", sock, "--pattern", p.TargetArg(), "--threads", strconv.Itoa(threads),
		"--seed", strconv.FormatUint(seed%(1<<62), 10)}

	runtime.GC()
	resetPeakRSS()
	mi0 := Meminfo()
	su0, ss0, sf0 := rusage(unix.RUSAGE_SELF)
	cu0, cs0, cf0 := rusage(unix.RUSAGE_CHILDREN)
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, target, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr

	t0 := time.Now()
	l, err := restore.NewLoader(ctx, env.Snap, env.restoreOptions(restore.WithMode(md), restore.ForTargets())...)
	if err != nil {
		return fail(err)
	}
	defer l.Close()
	srv, err := attach.Listen(sock, attach.FromLoader(l), attach.Options{})
	if err != nil {
		return fail(err)
	}
	defer srv.Close()
	started := time.Since(t0)
	if err := cmd.Run(); err != nil {
		return fail(fmt.Errorf("%s: %w: %s", target, err, bytes.TrimSpace(stderr.Bytes())))
	}
	wall := time.Since(t0)
	su1, ss1, sf1 := rusage(unix.RUSAGE_SELF)
	cu1, cs1, cf1 := rusage(unix.RUSAGE_CHILDREN)
	selfRSS := procStatusKiB(0, "VmHWM") << 10
	mi1 := Meminfo()
	hugetlb := max(0, mi0["HugePages_Free"]-mi1["HugePages_Free"]) * mi1["Hugepagesize"] << 10
	var out targetOutput
	if err := json.Unmarshal(bytes.TrimSpace(stdout.Bytes()), &out); err != nil {
		return fail(fmt.Errorf("parse %s output %q: %w", target, stdout.String(), err))
	}
	st := l.Stats()

	m := res.Metrics
	startMS := ms(started)
	m[MReady] = startMS + out.ReadyMS
	m[MFirstByte] = startMS + out.FirstByteMS
	m[MFirstTouch] = max(0, out.FirstByteMS-out.ReadyMS)
	m[MComplete] = min(ms(wall), startMS+out.ReadyMS+out.TouchMS)
	m[MLoaded] = startMS
	m[MTouches] = float64(out.Pages)
	setFaults(m, figuresOf(st))
	m[MTouchP50], m[MTouchP90], m[MTouchP99], m[MTouchMax] = out.Lat.P50, out.Lat.P90, out.Lat.P99, out.Lat.Max
	user := (su1 - su0) + (cu1 - cu0)
	sys := (ss1 - ss0) + (cs1 - cs0)
	m[MCPUUser], m[MCPUSys], m[MCPU] = nsToMS(user), nsToMS(sys), nsToMS(user+sys)
	m[MHelperCPU] = 0
	m[MMinflt] = float64((sf1 - sf0) + (cf1 - cf0))
	m[MRSSPeak] = mib(selfRSS)
	m[MHelperRSS] = 0
	m[MHugetlb] = mib(hugetlb)
	m[MMemPeak] = mib(selfRSS + hugetlb)

	// Verify: a second target attaches and dumps every region.
	dump := filepath.Join(dir, "dump")
	stderr.Reset()
	vc := exec.CommandContext(ctx, target, "--socket", sock, "--dump", dump)
	vc.Stdout, vc.Stderr = nil, &stderr
	if err := vc.Run(); err != nil {
		return fail(fmt.Errorf("verify: %s --dump: %w: %s", target, err, bytes.TrimSpace(stderr.Bytes())))
	}
	if err := verifyDump(env.Image, env.Layout, dump); err != nil {
		return fail(err)
	}
	m[MVerifiedOK] = 1
	if err := srv.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return fail(fmt.Errorf("close server: %w", err))
	}
	if err := l.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return fail(fmt.Errorf("close loader: %w", err))
	}
	return res
}

// verifyDump checks a target's --dump file (the regions' bytes, one after
// the other) against the image, streaming.
func verifyDump(image string, l Layout, dump string) error {
	df, err := os.Open(dump)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	defer df.Close()
	if st, err := df.Stat(); err != nil || st.Size() != l.RawBytes {
		return fmt.Errorf("verify: the target dumped %v bytes, the snapshot has %d (%v)", st.Size(), l.RawBytes, err)
	}
	imf, err := os.Open(image)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	defer imf.Close()
	a, b := make([]byte, 4<<20), make([]byte, 4<<20)
	var pos int64
	for _, r := range l.Regions {
		for off := int64(0); off < r.Length; off += int64(len(a)) {
			n := min(int64(len(a)), r.Length-off)
			if _, err := df.ReadAt(a[:n], pos+off); err != nil {
				return fmt.Errorf("verify: read dump: %w", err)
			}
			if _, err := imf.ReadAt(b[:n], r.Offset+off); err != nil {
				return fmt.Errorf("verify: read image: %w", err)
			}
			if !bytes.Equal(a[:n], b[:n]) {
				i := 0
				for a[i] == b[i] {
					i++
				}
				return fmt.Errorf("verify: region %s differs from the image at offset %d in the target (got %#02x, want %#02x)", r.Name, off+int64(i), a[i], b[i])
			}
		}
		pos += r.Length
	}
	return nil
}
