package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const greeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}` + "\n"

// fakeQEMU serves one connection with handle, after the greeting.
func fakeQEMU(t *testing.T, greet string, handle func(c *net.UnixConn, r *bufio.Reader)) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.AcceptUnix()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte(greet))
		if handle != nil {
			handle(c, bufio.NewReader(c))
		}
	}()
	return p
}

type cmdMsg struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

func readCmd(t *testing.T, r *bufio.Reader) (cmdMsg, bool) {
	line, err := r.ReadBytes('\n')
	if err != nil {
		return cmdMsg{}, false
	}
	var m cmdMsg
	if err := json.Unmarshal(line, &m); err != nil {
		t.Errorf("bad command %q: %v", line, err)
		return m, false
	}
	return m, true
}

func sendReply(c net.Conn, id json.RawMessage, body string) {
	c.Write([]byte(`{` + body + `, "id": ` + string(id) + "}\n"))
}

func TestDialCommandsEventsErrors(t *testing.T) {
	p := fakeQEMU(t, greeting, func(c *net.UnixConn, r *bufio.Reader) {
		m, ok := readCmd(t, r)
		if !ok || m.Execute != "qmp_capabilities" {
			t.Errorf("first command %q, want qmp_capabilities", m.Execute)
			return
		}
		sendReply(c, m.ID, `"return": {}`)
		for {
			m, ok := readCmd(t, r)
			if !ok {
				return
			}
			switch m.Execute {
			case "query-status":
				// An event first, then the reply: the client must route both.
				c.Write([]byte(`{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}` + "\n"))
				sendReply(c, m.ID, `"return": {"status": "running", "running": true}`)
			case "nope":
				sendReply(c, m.ID, `"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}`)
			case "bad":
				sendReply(c, m.ID, `"error": {"class": "GenericError", "desc": "it failed"}`)
			case "echo":
				sendReply(c, m.ID, `"return": `+string(m.Arguments))
			}
		}
	})
	ctx := context.Background()
	c, err := Dial(ctx, p, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v := c.Version(); v.String() != "7.2.22" || v.Package != "Debian" {
		t.Errorf("version %+v", v)
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := c.Run(ctx, "query-status", nil, &st); err != nil || st.Status != "running" {
		t.Fatalf("query-status: %+v %v", st, err)
	}
	ev, err := c.WaitEvent(ctx, "STOP", 0)
	if err != nil || ev.Name != "STOP" {
		t.Fatalf("event %+v %v", ev, err)
	}
	_, err = c.Execute(ctx, "nope", nil)
	var qe *Error
	if !errors.Is(err, ErrCommandNotFound) || !errors.As(err, &qe) || qe.Command != "nope" || !strings.Contains(err.Error(), "has not been found") {
		t.Errorf("unknown command: %v", err)
	}
	if _, err := c.Execute(ctx, "bad", nil); !errors.Is(err, ErrGenericError) || errors.Is(err, ErrCommandNotFound) {
		t.Errorf("generic error: %v", err)
	}
	var out map[string]string
	if err := c.Run(ctx, "echo", map[string]string{"a": "b"}, &out); err != nil || out["a"] != "b" {
		t.Errorf("echo: %v %v", out, err)
	}
	// No STOP after index 1: WaitEvent honours its context.
	wctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := c.WaitEvent(wctx, "STOP", 1); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitEvent past the only STOP: %v", err)
	}
}

// getfd: the descriptor travels with the command (SCM_RIGHTS), and the
// server can use it.
func TestExecuteWithFD(t *testing.T) {
	got := make(chan string, 1)
	p := fakeQEMU(t, greeting, func(c *net.UnixConn, _ *bufio.Reader) {
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(4))
		var pend []byte
		for {
			n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			pend = append(pend, buf[:n]...)
			var fds []int
			if oobn > 0 {
				msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
				for _, m := range msgs {
					f, _ := unix.ParseUnixRights(&m)
					fds = append(fds, f...)
				}
			}
			for {
				i := strings.IndexByte(string(pend), '\n')
				if i < 0 {
					break
				}
				var m cmdMsg
				json.Unmarshal(pend[:i], &m)
				pend = pend[i+1:]
				if m.Execute == "getfd" {
					if len(fds) != 1 {
						sendReply(c, m.ID, `"error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}`)
						continue
					}
					f := os.NewFile(uintptr(fds[0]), "passed")
					f.Write([]byte("through the fd"))
					f.Close()
					got <- string(m.Arguments)
				}
				sendReply(c, m.ID, `"return": {}`)
			}
		}
	})
	ctx := context.Background()
	c, err := Dial(ctx, p, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var pp [2]int
	if err := unix.Pipe2(pp[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	r, w := os.NewFile(uintptr(pp[0]), "r"), os.NewFile(uintptr(pp[1]), "w")
	defer r.Close()
	if _, err := c.ExecuteWithFD(ctx, "getfd", map[string]string{"fdname": "x"}, int(w.Fd())); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if a := <-got; !strings.Contains(a, `"fdname":"x"`) {
		t.Errorf("arguments %s", a)
	}
	b := make([]byte, 64)
	n, _ := r.Read(b)
	if string(b[:n]) != "through the fd" {
		t.Errorf("read %q through the passed fd", b[:n])
	}
	// Without the fd the (fake) QEMU refuses.
	if _, err := c.Execute(ctx, "getfd", map[string]string{"fdname": "y"}); !errors.Is(err, ErrGenericError) {
		t.Errorf("getfd without an fd: %v", err)
	}
}

func TestDialErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	if _, err := Dial(ctx, filepath.Join(dir, "missing.sock"), time.Second); !errors.Is(err, ErrNoSocket) {
		t.Errorf("missing socket: %v", err)
	}
	// A socket file nobody listens on any more.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := Dial(ctx, stale, time.Second); !errors.Is(err, ErrNoSocket) {
		t.Errorf("stale socket: %v", err)
	}
	// Not QEMU: another greeting, silence, a hang-up.
	if _, err := Dial(ctx, fakeQEMU(t, "SSH-2.0-OpenSSH_9.2\r\n", nil), time.Second); !errors.Is(err, ErrNotQMP) {
		t.Errorf("ssh greeting: %v", err)
	}
	if _, err := Dial(ctx, fakeQEMU(t, `{"hello": 1}`+"\n", nil), time.Second); !errors.Is(err, ErrNotQMP) {
		t.Errorf("other JSON: %v", err)
	}
	silent := fakeQEMU(t, "", func(c *net.UnixConn, r *bufio.Reader) { r.ReadByte() })
	if _, err := Dial(ctx, silent, 200*time.Millisecond); !errors.Is(err, ErrNotQMP) || !strings.Contains(err.Error(), "no greeting") {
		t.Errorf("silent peer: %v", err)
	}
	if _, err := Dial(ctx, fakeQEMU(t, "", nil), time.Second); !errors.Is(err, ErrNotQMP) {
		t.Errorf("hang-up: %v", err)
	}
	// A regular file is not a socket.
	reg := filepath.Join(dir, "file")
	os.WriteFile(reg, nil, 0o600)
	if _, err := Dial(ctx, reg, time.Second); err == nil {
		t.Error("a regular file dialled")
	}
}

// QEMU exiting mid-command ends the command with ErrClosed, not a hang.
func TestQEMUExits(t *testing.T) {
	p := fakeQEMU(t, greeting, func(c *net.UnixConn, r *bufio.Reader) {
		m, _ := readCmd(t, r)
		sendReply(c, m.ID, `"return": {}`)
		readCmd(t, r) // the next command: hang up instead of replying
	})
	ctx := context.Background()
	c, err := Dial(ctx, p, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Execute(ctx, "stop", nil); !errors.Is(err, ErrClosed) {
		t.Errorf("QEMU gone: %v", err)
	}
	if _, err := c.Execute(ctx, "cont", nil); !errors.Is(err, ErrClosed) {
		t.Errorf("after the end: %v", err)
	}
	if _, err := c.WaitEvent(ctx, "RESUME", 0); !errors.Is(err, ErrClosed) {
		t.Errorf("WaitEvent after the end: %v", err)
	}
}
