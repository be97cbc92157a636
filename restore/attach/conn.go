package attach

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// oobSize is the control buffer of a receive: room for maxFDs descriptors.
// A peer that sends more gets MSG_CTRUNC, which is "message too large".
var oobSize = unix.CmsgSpace(maxFDs * 4)

// SendMsg sends v (a message struct, or raw JSON bytes) as one datagram on
// c, with fds attached as SCM_RIGHTS. The caller keeps its fds.
func SendMsg(c *net.UnixConn, v any, fds ...int) error {
	b, err := marshal(v)
	if err != nil {
		return err
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	// Not WriteMsgUnix: it sends with flags 0, and PROTOCOL.md §1 says
	// senders use MSG_NOSIGNAL. Through the poller, so write deadlines hold.
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("attach: send: %w", err)
	}
	var n int
	var serr error
	werr := rc.Write(func(fd uintptr) bool {
		for {
			n, serr = unix.SendmsgN(int(fd), b, oob, nil, unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT)
			if serr != unix.EINTR {
				break
			}
		}
		return serr != unix.EAGAIN
	})
	if werr == nil && serr != nil {
		werr = os.NewSyscallError("sendmsg", serr)
	}
	if werr != nil {
		return fmt.Errorf("attach: send: %w", werr)
	}
	if n != len(b) {
		return fmt.Errorf("attach: send: short write (%d of %d bytes)", n, len(b))
	}
	return nil
}

// RecvMsg receives one datagram from c: its bytes and the fds that came
// with it (close-on-exec, owned by the caller). A message longer than
// MaxMsgSize or with more than a few fds is ErrTooLarge (its fds are
// closed); an empty read is ErrClosed.
func RecvMsg(c *net.UnixConn) ([]byte, []int, error) {
	bp := recvBufs.Get().(*[]byte)
	defer recvBufs.Put(bp)
	buf := *bp
	oob := make([]byte, oobSize)
	// On Linux, net passes MSG_CMSG_CLOEXEC.
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if errors.Is(err, io.EOF) {
		return nil, nil, ErrClosed
	}
	if err != nil {
		return nil, nil, fmt.Errorf("attach: receive: %w", err)
	}
	return finishRecv(buf, oob, n, oobn, flags)
}

// SendMsgFD is SendMsg on a raw SOCK_SEQPACKET socket fd.
func SendMsgFD(sock int, v any, fds ...int) error {
	b, err := marshal(v)
	if err != nil {
		return err
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	for {
		err = unix.Sendmsg(sock, b, oob, nil, unix.MSG_NOSIGNAL)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("attach: send: %w", os.NewSyscallError("sendmsg", err))
	}
	return nil
}

// RecvMsgFD is RecvMsg on a raw SOCK_SEQPACKET socket fd (blocking).
func RecvMsgFD(sock int) ([]byte, []int, error) {
	bp := recvBufs.Get().(*[]byte)
	defer recvBufs.Put(bp)
	buf := *bp
	oob := make([]byte, oobSize)
	var n, oobn, flags int
	var err error
	for {
		n, oobn, flags, _, err = unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return nil, nil, fmt.Errorf("attach: receive: %w", os.NewSyscallError("recvmsg", err))
	}
	return finishRecv(buf, oob, n, oobn, flags)
}

func marshal(v any) ([]byte, error) {
	if b, ok := v.([]byte); ok {
		if len(b) > MaxMsgSize {
			return nil, fmt.Errorf("%w: %d bytes, the limit is %d", ErrTooLarge, len(b), MaxMsgSize)
		}
		return b, nil
	}
	return Encode(v)
}

func finishRecv(buf, oob []byte, n, oobn, flags int) ([]byte, []int, error) {
	fds, perr := parseRights(oob[:oobn])
	switch {
	case flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > MaxMsgSize:
		CloseFDs(fds)
		return nil, nil, fmt.Errorf("%w: more than %d bytes or %d fds", ErrTooLarge, MaxMsgSize, maxFDs)
	case perr != nil:
		CloseFDs(fds)
		return nil, nil, perr
	case n == 0:
		// SOCK_SEQPACKET: a zero-length read is the peer's close (the
		// protocol has no empty messages).
		CloseFDs(fds)
		return nil, nil, ErrClosed
	}
	return bytes.Clone(buf[:n]), fds, nil
}

// recvBufs are receive buffers of MaxMsgSize+1 bytes, reused: a message is
// copied out at its own length. Measured in a fresh helper process on a
// 2-vCPU VM, receiving the attach (two datagrams) into new 64 KiB buffers
// took 0.3-0.5 ms of a prestarted first byte (fresh pages, zeroed).
var recvBufs = sync.Pool{New: func() any { b := make([]byte, MaxMsgSize+1); return &b }}

func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("attach: receive: control data: %w", err)
	}
	var fds []int
	var errs []error
	for i := range cmsgs {
		if cmsgs[i].Header.Level != unix.SOL_SOCKET || cmsgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		f, err := unix.ParseUnixRights(&cmsgs[i])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		fds = append(fds, f...)
	}
	if len(errs) > 0 {
		return fds, fmt.Errorf("attach: receive: SCM_RIGHTS: %w", errors.Join(errs...))
	}
	return fds, nil
}

// CloseFDs closes every fd in fds.
func CloseFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// IsUserfaultfd reports whether fd (of this process) is a userfaultfd,
// by what /proc/self/fd/N links to.
func IsUserfaultfd(fd int) bool {
	t, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	return err == nil && t == "anon_inode:[userfaultfd]"
}
