// Package qmp is a small client for the QEMU Machine Protocol over a Unix
// socket: the greeting, capabilities negotiation, commands with ids,
// asynchronous events, error classes as named errors, and file-descriptor
// passing (SCM_RIGHTS) for getfd.
package qmp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Errors. A command's error reply is an *Error whose Is matches the
// sentinel of its class.
var (
	// ErrNoSocket: nothing listens on the QMP socket path (no such file, or
	// connection refused: the QEMU that made it is gone).
	ErrNoSocket = errors.New("qmp: no QMP server on the socket")
	// ErrNotQMP: the peer did not greet with a QMP greeting (not QEMU, or a
	// socket of another kind).
	ErrNotQMP = errors.New("qmp: the peer is not a QEMU QMP server")
	// ErrClosed: the connection ended (QEMU exited or closed the socket).
	ErrClosed = errors.New("qmp: connection closed")

	// Error classes of QMP error replies.
	ErrGenericError    = errors.New("qmp: GenericError")
	ErrCommandNotFound = errors.New("qmp: CommandNotFound")
	ErrDeviceNotActive = errors.New("qmp: DeviceNotActive")
	ErrDeviceNotFound  = errors.New("qmp: DeviceNotFound")
	ErrKVMMissingCap   = errors.New("qmp: KVMMissingCap")
)

var classes = map[string]error{
	"GenericError":    ErrGenericError,
	"CommandNotFound": ErrCommandNotFound,
	"DeviceNotActive": ErrDeviceNotActive,
	"DeviceNotFound":  ErrDeviceNotFound,
	"KVMMissingCap":   ErrKVMMissingCap,
}

// Error is a QMP error reply to a command.
type Error struct {
	Command string
	Class   string
	Desc    string
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp: %s: %s (%s)", e.Command, e.Desc, e.Class)
}

// Is matches the sentinel of the error's class.
func (e *Error) Is(target error) bool { return classes[e.Class] == target }

// Event is an asynchronous QMP event.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
	Time time.Time       `json:"-"`
}

// Version is QEMU's version from the greeting.
type Version struct {
	Major, Minor, Micro int
	Package             string
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro) }

type reply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

// Client is a QMP connection. Its methods are safe for concurrent use.
type Client struct {
	c       *net.UnixConn
	version Version
	caps    []string

	wmu sync.Mutex // serialises writes

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan reply
	events  []Event
	evWake  chan struct{} // closed and replaced when an event arrives
	err     error         // set when the reader ends
	done    chan struct{}
	rbuf    []byte // bytes read past the last line (reader only)
}

// Dial connects to the QMP socket at path, reads the greeting and
// negotiates capabilities. The greeting must arrive within timeout.
func Dial(ctx context.Context, path string, timeout time.Duration) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("%w %s: %v (is QEMU running with -qmp unix:%s,server=on,wait=off?)", ErrNoSocket, path, unwrapOp(err), path)
		}
		if errors.Is(err, syscall.EPROTOTYPE) || errors.Is(err, syscall.ENOTSOCK) {
			return nil, fmt.Errorf("%w: %s: %v", ErrNotQMP, path, unwrapOp(err))
		}
		return nil, fmt.Errorf("qmp: connect %s: %w", path, err)
	}
	c := &Client{c: nc.(*net.UnixConn), pending: map[uint64]chan reply{}, evWake: make(chan struct{}), done: make(chan struct{})}
	if err := c.greet(timeout); err != nil {
		nc.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	go c.read()
	if _, err := c.Execute(ctx, "qmp_capabilities", nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func unwrapOp(err error) error {
	var op *net.OpError
	if errors.As(err, &op) {
		return op.Err
	}
	return err
}

// greet reads the greeting line by line (QEMU sends one JSON object per
// line) with a deadline, so a silent peer cannot hang us.
func (c *Client) greet(timeout time.Duration) error {
	c.c.SetReadDeadline(time.Now().Add(timeout))
	defer c.c.SetReadDeadline(time.Time{})
	line, err := c.readLine()
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("%w: no greeting within %s", ErrNotQMP, timeout)
		}
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("%w: it closed the connection without a greeting", ErrNotQMP)
		}
		return fmt.Errorf("%w: reading the greeting: %v", ErrNotQMP, err)
	}
	var g struct {
		QMP *struct {
			Version struct {
				QEMU struct {
					Major int `json:"major"`
					Minor int `json:"minor"`
					Micro int `json:"micro"`
				} `json:"qemu"`
				Package string `json:"package"`
			} `json:"version"`
			Capabilities []string `json:"capabilities"`
		} `json:"QMP"`
	}
	if err := json.Unmarshal(line, &g); err != nil || g.QMP == nil {
		return fmt.Errorf("%w: its first message is %.60q, not a QMP greeting", ErrNotQMP, line)
	}
	v := g.QMP.Version
	c.version = Version{v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro, v.Package}
	c.caps = g.QMP.Capabilities
	return nil
}

// maxLine bounds one QMP message.
var maxLine = 16 << 20

func (c *Client) readLine() ([]byte, error) {
	return readLine(c.c, &c.rbuf)
}

// Version returns QEMU's version from the greeting.
func (c *Client) Version() Version { return c.version }

func (c *Client) read() {
	var err error
	for {
		var line []byte
		line, err = c.readLine()
		if err != nil {
			break
		}
		var m struct {
			ID    *uint64         `json:"id"`
			Event string          `json:"event"`
			Data  json.RawMessage `json:"data"`
			reply
		}
		if jerr := json.Unmarshal(line, &m); jerr != nil {
			err = fmt.Errorf("qmp: bad message %.80q: %v", line, jerr)
			break
		}
		if m.Event != "" {
			c.mu.Lock()
			c.events = append(c.events, Event{Name: m.Event, Data: m.Data, Time: time.Now()})
			close(c.evWake)
			c.evWake = make(chan struct{})
			c.mu.Unlock()
			continue
		}
		if m.ID == nil {
			continue // a reply without id: we always send ids
		}
		c.mu.Lock()
		ch := c.pending[*m.ID]
		delete(c.pending, *m.ID)
		c.mu.Unlock()
		if ch != nil {
			ch <- m.reply
		}
	}
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) {
		err = ErrClosed
	}
	c.mu.Lock()
	c.err = err
	for id, ch := range c.pending {
		close(ch)
		delete(c.pending, id)
	}
	close(c.evWake)
	c.evWake = make(chan struct{})
	c.mu.Unlock()
	close(c.done)
}

// Execute runs a command with arguments (nil for none) and returns its
// "return" value.
func (c *Client) Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	return c.execute(ctx, cmd, args, -1)
}

// ExecuteWithFD runs a command with fd attached to it (SCM_RIGHTS), as
// getfd and add-fd take a descriptor. The caller keeps its fd.
func (c *Client) ExecuteWithFD(ctx context.Context, cmd string, args any, fd int) (json.RawMessage, error) {
	return c.execute(ctx, cmd, args, fd)
}

func (c *Client) execute(ctx context.Context, cmd string, args any, fd int) (json.RawMessage, error) {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	c.nextID++
	id := c.nextID
	ch := make(chan reply, 1)
	c.pending[id] = ch
	c.mu.Unlock()

	msg := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{cmd, args, id}
	b, err := json.Marshal(msg)
	if err != nil {
		c.forget(id)
		return nil, fmt.Errorf("qmp: %s: arguments: %w", cmd, err)
	}
	b = append(b, '\n')
	c.wmu.Lock()
	if fd >= 0 {
		var n, oobn int
		n, oobn, err = c.c.WriteMsgUnix(b, unix.UnixRights(fd), nil)
		if err == nil && (n != len(b) || oobn == 0) {
			err = io.ErrShortWrite
		}
	} else {
		_, err = c.c.Write(b)
	}
	c.wmu.Unlock()
	if err != nil {
		c.forget(id)
		if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, net.ErrClosed) {
			err = ErrClosed
		}
		return nil, fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	select {
	case r, ok := <-ch:
		if !ok {
			c.mu.Lock()
			err := c.err
			c.mu.Unlock()
			return nil, fmt.Errorf("qmp: %s: %w", cmd, err)
		}
		if r.Error != nil {
			return nil, &Error{Command: cmd, Class: r.Error.Class, Desc: r.Error.Desc}
		}
		return r.Return, nil
	case <-ctx.Done():
		c.forget(id)
		return nil, fmt.Errorf("qmp: %s: %w", cmd, ctx.Err())
	}
}

func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// Run executes cmd and decodes its return value into out (if not nil).
func (c *Client) Run(ctx context.Context, cmd string, args, out any) error {
	r, err := c.Execute(ctx, cmd, args)
	if err != nil {
		return err
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(r, out); err != nil {
		return fmt.Errorf("qmp: %s: unexpected reply %.120s: %w", cmd, r, err)
	}
	return nil
}

// Events returns the events received so far from index from on, and the
// index to pass next time.
func (c *Client) Events(from int) ([]Event, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if from > len(c.events) {
		from = len(c.events)
	}
	return append([]Event(nil), c.events[from:]...), len(c.events)
}

// WaitEvent waits for an event named name received at or after index from
// (see Events) and returns it.
func (c *Client) WaitEvent(ctx context.Context, name string, from int) (Event, error) {
	for {
		c.mu.Lock()
		for i := from; i < len(c.events); i++ {
			if c.events[i].Name == name {
				e := c.events[i]
				c.mu.Unlock()
				return e, nil
			}
		}
		from = len(c.events)
		wake, err := c.evWake, c.err
		c.mu.Unlock()
		if err != nil {
			return Event{}, fmt.Errorf("qmp: waiting for event %s: %w", name, err)
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return Event{}, fmt.Errorf("qmp: waiting for event %s: %w", name, ctx.Err())
		}
	}
}

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the connection.
func (c *Client) Close() error {
	err := c.c.Close()
	<-c.done
	return err
}

func readLine(r io.Reader, buf *[]byte) ([]byte, error) {
	for {
		if i := bytes.IndexByte(*buf, '\n'); i >= 0 {
			line := (*buf)[:i]
			*buf = (*buf)[i+1:]
			return bytes.TrimSpace(line), nil
		}
		if len(*buf) > maxLine {
			return nil, fmt.Errorf("qmp: message longer than %d bytes", maxLine)
		}
		var tmp [64 << 10]byte
		n, err := r.Read(tmp[:])
		*buf = append(*buf, tmp[:n]...)
		if err != nil {
			if n > 0 {
				continue
			}
			return nil, err
		}
	}
}
