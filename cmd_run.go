package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/uffdrestore/uffdrestore/restore/attach"
)

// The environment the preload library (csrc/ur_preload.c) reads.
const (
	envPreloadSocket    = "UFFDRESTORE_SOCKET"
	envPreloadMap       = "UFFDRESTORE_MAP"
	envPreloadServerUID = "UFFDRESTORE_SERVER_UID"
	preloadName         = "libuffdrestore-preload.so"
)

func init() {
	registerCommand(&cli.Command{
		Name:      "run",
		Usage:     "run an unmodified program whose open+mmap of a marker path maps a served snapshot lazily",
		ArgsUsage: "-- CMD [ARGS...]",
		Description: `run starts CMD with the preload library (` + preloadName + `, next to
the uffdrestore binary) so that when CMD opens a marker path given with --map
and mmaps it, it gets the snapshot that "uffdrestore load" serves on --socket,
filled lazily on first touch. Nothing of CMD changes: the marker need not
exist; fstat/lseek report the region's size, ftruncate to that size or less
is a no-op; MAP_SHARED, MAP_PRIVATE (copy-on-write clones) and MAP_FIXED work.

--map PATH[=REGION]: REGION is a region name or #INDEX (default: the
snapshot's only region); repeat --map for more markers. Before starting CMD,
run checks that the server is reachable and trusted (root, this uid or
--server-uid) and that every region exists. A non-root CMD works when the
server allows its uid (load --allow-uid). The preload prints one line
"uffdrestore-preload: ..." and fails the call with an errno on any error.

Examples:
   uffdrestore load vm.snap --socket /tmp/s.sock &
   uffdrestore run --socket /tmp/s.sock --map /tmp/ram -- qemu-system-x86_64 \
       -object memory-backend-file,id=mem,size=512M,mem-path=/tmp/ram,share=off \
       -machine memory-backend=mem ...`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "socket", Aliases: []string{"s"}, Usage: "the socket of uffdrestore load (`PATH`)", Required: true},
			&cli.StringSliceFlag{Name: "map", Usage: "a marker `PATH[=REGION]` (region name or #INDEX; default: the only region)", Required: true},
			&cli.StringFlag{Name: "server-uid", Usage: "one more `UID` the server may run as (besides root and this uid)"},
			&cli.StringFlag{Name: "preload", Usage: "the preload library (default: " + preloadName + " next to the uffdrestore binary)"},
		},
		Action: cmdRun,
	})
}

// runMarker is one --map.
type runMarker struct{ path, region string }

func parseRunMaps(specs []string) ([]runMarker, error) {
	var out []runMarker
	for _, s := range specs {
		p, r, _ := strings.Cut(s, "=")
		if p == "" {
			return nil, fmt.Errorf("--map %q: want PATH[=REGION]", s)
		}
		if strings.Contains(p, ":") {
			return nil, fmt.Errorf("--map %q: the marker path may not contain ':' (it separates markers in %s)", s, envPreloadMap)
		}
		if strings.ContainsAny(r, ":") {
			return nil, fmt.Errorf("--map %q: the region may not contain ':'", s)
		}
		abs, err := filepath.Abs(p)
		if err != nil {
			return nil, fmt.Errorf("--map %q: %w", s, err)
		}
		out = append(out, runMarker{abs, r})
	}
	return out, nil
}

// regionIndex resolves a --map region against the server's hello.
func regionIndex(h *attach.Hello, region string) (int, error) {
	names := func() string {
		var b []string
		for i, r := range h.Regions {
			if len(b) == 20 {
				b = append(b, "...")
				break
			}
			b = append(b, fmt.Sprintf("#%d %q", i, r.Name))
		}
		return strings.Join(b, ", ")
	}
	var idx int
	switch {
	case region == "":
		if len(h.Regions) != 1 {
			return 0, fmt.Errorf("the snapshot has %d regions (%s): name one, PATH=NAME or PATH=#INDEX", len(h.Regions), names())
		}
	case strings.HasPrefix(region, "#"):
		n, err := strconv.Atoi(region[1:])
		if err != nil || n < 0 || n >= len(h.Regions) {
			return 0, fmt.Errorf("region %s does not exist: the snapshot has regions #0..#%d", region, len(h.Regions)-1)
		}
		idx = n
	default:
		found := h.Find(region)
		if len(found) == 0 {
			return 0, fmt.Errorf("the snapshot has no region %q (its regions: %s)", region, names())
		}
		if len(found) > 1 {
			return 0, fmt.Errorf("several regions are named %q: name one by index, PATH=#INDEX", region)
		}
		idx = found[0]
	}
	if h.Regions[idx].Size == 0 {
		return 0, fmt.Errorf("region #%d %q is empty: nothing to map", idx, h.Regions[idx].Name)
	}
	return idx, nil
}

// probeServer connects to the server as the program will (this uid), checks
// it is trusted and returns its hello; it attaches nothing.
func probeServer(path string, serverUID uint32) (*attach.Hello, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		hint := ""
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			hint = ": is the server running? start `uffdrestore load SNAPSHOT --socket " + path + "` first"
		}
		return nil, fmt.Errorf("cannot reach the server on %s: %w%s", path, err, hint)
	}
	defer c.Close()
	if err := attach.CheckServer(c, path, serverUID); err != nil {
		return nil, fmt.Errorf("%w (uffdrestore run --server-uid)", err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	h, fds, err := attach.RecvHello(func() ([]byte, []int, error) { return attach.RecvMsg(c) })
	attach.CloseFDs(fds)
	if err != nil {
		if errors.Is(err, attach.ErrRefused) && strings.Contains(err.Error(), "may not attach") {
			return nil, fmt.Errorf("%w: start the server with --allow-uid %d", err, os.Geteuid())
		}
		return nil, err
	}
	// Say why we hang up, so the server's log does not show a mystery.
	c.SetWriteDeadline(time.Now().Add(time.Second))
	attach.SendMsg(c, attach.Reply{Type: attach.TypeError, Error: "uffdrestore run checked the server before starting its program (no attach)"})
	return &h, nil
}

// findPreload is --preload, or the library next to this executable.
func findPreload(flag string) (string, error) {
	p := flag
	if p == "" {
		exe, err := os.Executable()
		if err != nil {
			return "", fmt.Errorf("find the preload library: %w (give --preload)", err)
		}
		if r, err := filepath.EvalSymlinks(exe); err == nil {
			exe = r
		}
		p = filepath.Join(filepath.Dir(exe), preloadName)
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(abs); err != nil {
		return "", fmt.Errorf("the preload library %s: %w (build it with `make build`, or give --preload)", abs, err)
	}
	return abs, nil
}

// runEnv is env with the preload's variables set (LD_PRELOAD appended to).
func runEnv(env []string, preload, socket string, maps []runMarker, serverUID string) []string {
	var mapv []string
	for _, m := range maps {
		if m.region != "" {
			mapv = append(mapv, m.path+"="+m.region)
		} else {
			mapv = append(mapv, m.path)
		}
	}
	set := map[string]string{
		envPreloadSocket:    socket,
		envPreloadMap:       strings.Join(mapv, ":"),
		envPreloadServerUID: serverUID,
		"LD_PRELOAD":        preload,
	}
	var out []string
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		if _, ok := set[k]; !ok {
			out = append(out, kv)
			continue
		}
		if k == "LD_PRELOAD" && v != "" {
			set[k] = v + ":" + preload
		}
	}
	for _, k := range []string{"LD_PRELOAD", envPreloadSocket, envPreloadMap, envPreloadServerUID} {
		if set[k] != "" {
			out = append(out, k+"="+set[k])
		}
	}
	return out
}

func cmdRun(c *cli.Context) error {
	args := c.Args().Slice()
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		return cli.Exit("run: no command: uffdrestore run --socket S --map PATH -- CMD [ARGS...]", 2)
	}
	maps, err := parseRunMaps(c.StringSlice("map"))
	if err != nil {
		return cli.Exit("run: "+err.Error(), 2)
	}
	var serverUID uint32
	if s := c.String("server-uid"); s != "" {
		u, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return cli.Exit(fmt.Sprintf("run: --server-uid %q is not a uid", s), 2)
		}
		serverUID = uint32(u)
	}
	preload, err := findPreload(c.String("preload"))
	if err != nil {
		return cli.Exit("run: "+err.Error(), 1)
	}
	socket, err := filepath.Abs(c.String("socket"))
	if err != nil {
		return cli.Exit("run: --socket: "+err.Error(), 2)
	}
	h, err := probeServer(socket, serverUID)
	if err != nil {
		return cli.Exit("run: "+err.Error(), 1)
	}
	for _, m := range maps {
		if _, err := regionIndex(h, m.region); err != nil {
			return cli.Exit(fmt.Sprintf("run: --map %s: %v", m.path, err), 1)
		}
	}
	bin, err := exec.LookPath(args[0])
	if err != nil {
		return cli.Exit("run: "+err.Error(), 127)
	}
	env := runEnv(os.Environ(), preload, socket, maps, c.String("server-uid"))
	err = syscall.Exec(bin, args, env)
	return cli.Exit(fmt.Sprintf("run: exec %s: %v", bin, err), 126)
}
