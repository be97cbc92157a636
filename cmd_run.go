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
	"golang.org/x/sys/unix"
)

// The environment the preload library (csrc/ur_preload.c) reads.
const (
	envPreloadSocket    = "UFFDRESTORE_SOCKET"
	envPreloadMap       = "UFFDRESTORE_MAP"
	envPreloadServerUID = "UFFDRESTORE_SERVER_UID"
	envPreloadSocketFD  = "UFFDRESTORE_SOCKET_FD" // run's checked connection, for the preload to take over
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
--server-uid) and that every #INDEX exists, and hands its connection to CMD
(so the check is not a target that comes and goes: "load --once" serves CMD). A non-root CMD works when the
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

// checkRegion checks a --map region against what the hello says: how many
// regions there are (their names come after it; the preload checks a name
// when the program opens the marker).
func checkRegion(h *attach.Hello, region string) error {
	switch {
	case region == "":
		if h.RegionCount != 1 {
			return fmt.Errorf("the snapshot has %d regions: name one, PATH=NAME or PATH=#INDEX (`uffdrestore snapshot info` lists them)", h.RegionCount)
		}
	case strings.HasPrefix(region, "#"):
		n, err := strconv.Atoi(region[1:])
		if err != nil || n < 0 || n >= h.RegionCount {
			return fmt.Errorf("region %s does not exist: the snapshot has regions #0..#%d", region, h.RegionCount-1)
		}
	}
	return nil
}

// probeServer connects to the server as the program will (this uid) and
// checks it is trusted; it peeks at the hello (leaving it, and its backing
// fd, in the socket) and returns it without its regions (they follow in
// batches), and the connection, which the program's preload library takes
// over (UFFDRESTORE_SOCKET_FD): so the check is no target that came and went,
// which would end a `load --once`.
func probeServer(path string, serverUID uint32) (*attach.Hello, *os.File, error) {
	c, err := dialServer(path, serverUID)
	if err != nil {
		return nil, nil, err
	}
	defer c.Close()
	raw, err := peekMsg(c, 10*time.Second)
	if err != nil {
		return nil, nil, fmt.Errorf("the server on %s: %w", path, err)
	}
	var h attach.Hello
	if err := attach.Decode(raw, attach.TypeHello, &h); err != nil {
		return nil, nil, allowUIDHint(err)
	}
	if err := h.ValidateHeader(); err != nil {
		return nil, nil, err
	}
	f, err := c.File() // a duplicate, close-on-exec
	if err != nil {
		return nil, nil, err
	}
	return &h, f, nil
}

// dialServer connects to the server on path as the program will (this uid)
// and checks that it is trusted (root, this uid or serverUID).
func dialServer(path string, serverUID uint32) (*net.UnixConn, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		hint := ""
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			hint = ": is the server running? start `uffdrestore load SNAPSHOT --socket " + path + "` first"
		}
		return nil, fmt.Errorf("cannot reach the server on %s: %w%s", path, err, hint)
	}
	if err := attach.CheckServer(c, path, serverUID); err != nil {
		c.Close()
		return nil, fmt.Errorf("%w (uffdrestore run --server-uid)", err)
	}
	return c, nil
}

// allowUIDHint adds the fix to a server's refusal of this uid.
func allowUIDHint(err error) error {
	if errors.Is(err, attach.ErrRefused) && strings.Contains(err.Error(), "may not attach") {
		return fmt.Errorf("%w: start the server with --allow-uid %d", err, os.Geteuid())
	}
	return err
}

// peekMsg returns the next message on c without taking it (MSG_PEEK);
// file descriptors the peek installs are closed.
func peekMsg(c *net.UnixConn, d time.Duration) ([]byte, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(d))
	defer c.SetReadDeadline(time.Time{})
	buf, oob := make([]byte, attach.MaxMsgSize+1), make([]byte, unix.CmsgSpace(4*4))
	var n, oobn int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		n, oobn, _, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_PEEK|unix.MSG_CMSG_CLOEXEC|unix.MSG_DONTWAIT)
		return rerr != unix.EAGAIN
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return nil, err
	}
	if cms, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, cm := range cms {
			fds, _ := unix.ParseUnixRights(&cm)
			attach.CloseFDs(fds)
		}
	}
	if n == 0 {
		return nil, attach.ErrClosed
	}
	return buf[:n], nil
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
		envPreloadSocketFD:  "", // only run's own (cmdRun adds it)
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
	bin, err := exec.LookPath(args[0])
	if err != nil {
		return cli.Exit("run: "+err.Error(), 127)
	}
	h, conn, err := probeServer(socket, serverUID)
	if err != nil {
		return cli.Exit("run: "+err.Error(), 1)
	}
	for _, m := range maps {
		if err := checkRegion(h, m.region); err != nil {
			return cli.Exit(fmt.Sprintf("run: --map %s: %v", m.path, err), 1)
		}
	}
	// The connection goes to the program (the preload takes it over).
	if _, err := unix.FcntlInt(conn.Fd(), unix.F_SETFD, 0); err != nil {
		return cli.Exit("run: "+err.Error(), 1)
	}
	env := runEnv(os.Environ(), preload, socket, maps, c.String("server-uid"))
	env = append(env, envPreloadSocketFD+"="+strconv.Itoa(int(conn.Fd())))
	err = syscall.Exec(bin, args, env)
	return cli.Exit(fmt.Sprintf("run: exec %s: %v", bin, err), 126)
}
