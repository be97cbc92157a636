package vmguest

import (
	"bufio"
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Config sizes the guest's pattern.
type Config struct {
	// PatternLines: the pattern is the output of `seq 1 PatternLines`
	// (every page different), written to a tmpfs file in guest RAM at
	// boot. 1,000,000 lines are 6.9 MB.
	PatternLines int
}

// PatternBytes is the pattern file's size.
func (c Config) PatternBytes() int64 {
	var n int64
	for d, lo := 1, 1; lo <= c.PatternLines; d, lo = d+1, lo*10 {
		hi := min(lo*10-1, c.PatternLines)
		n += int64(hi-lo+1) * int64(d+1)
	}
	return n
}

// PatternMD5 is the hex MD5 of the pattern as the guest writes it.
func (c Config) PatternMD5() string {
	h := md5.New()
	w := bufio.NewWriterSize(h, 1<<16)
	var b []byte
	for i := 1; i <= c.PatternLines; i++ {
		b = strconv.AppendInt(b[:0], int64(i), 10)
		b = append(b, '\n')
		w.Write(b)
	}
	w.Flush()
	return hex.EncodeToString(h.Sum(nil))
}

// WrittenMD5 is the MD5 of the pattern after the guest's "write TEXT"
// command (TEXT and a newline over its first bytes).
func (c Config) WrittenMD5(text string) string {
	h := md5.New()
	var all []byte
	for i := 1; i <= c.PatternLines; i++ {
		all = strconv.AppendInt(all, int64(i), 10)
		all = append(all, '\n')
	}
	copy(all, text+"\n")
	h.Write(all)
	return hex.EncodeToString(h.Sum(nil))
}

func (c Config) initScript() string {
	return fmt.Sprintf(`#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o size=100%% tmpfs /mnt
seq 1 %d > /mnt/pattern
(n=0; while :; do n=$((n+1)); echo $n > /run/c.tmp; mv /run/c.tmp /run/counter; sleep 0.1; done) &
boot=$(cat /proc/sys/kernel/random/boot_id)
stty -F /dev/ttyS0 -echo 2>/dev/null
echo "RESULT 0 ready $boot" > /dev/ttyS0
while read id cmd arg; do
  case "$cmd" in
    verify) r=$(md5sum /mnt/pattern); r=${r%%%% *};;
    counter) r=$(cat /run/counter);;
    write) echo "$arg" | dd of=/mnt/pattern conv=notrunc 2>/dev/null; r=$(md5sum /mnt/pattern); r=${r%%%% *};;
    boot) r=$boot;;
    *) r="unknown-command";;
  esac
  echo "RESULT $id $cmd $r"
done < /dev/ttyS0 > /dev/ttyS0
`, c.PatternLines)
}

// KernelCmdline is the kernel command line the guest needs.
const KernelCmdline = "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init"

// Console talks to the guest's init over its serial port (a QEMU chardev
// socket: -serial unix:PATH,server=on,wait=off).
type Console struct {
	c    net.Conn
	mu   sync.Mutex
	next int
	res  chan []string
	err  error
	done chan struct{}
	// Log gets every line the guest prints (kernel messages too).
	log  func(string)
	logM sync.Mutex
}

// DialConsole connects to the serial socket, retrying until ctx ends.
func DialConsole(ctx context.Context, path string, log func(string)) (*Console, error) {
	var c net.Conn
	var err error
	for {
		c, err = net.Dial("unix", path)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("guest: serial console %s: %w", path, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	con := &Console{c: c, res: make(chan []string, 16), done: make(chan struct{}), next: 1, log: log}
	go con.read()
	return con, nil
}

func (c *Console) read() {
	sc := bufio.NewScanner(c.c)
	sc.Buffer(make([]byte, 4096), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if c.log != nil {
			c.log(line)
		}
		if i := strings.Index(line, "RESULT "); i >= 0 {
			f := strings.Fields(line[i+len("RESULT "):])
			select {
			case c.res <- f:
			default:
			}
		}
	}
	c.err = sc.Err()
	if c.err == nil {
		c.err = errors.New("guest: serial console closed")
	}
	close(c.done)
}

// WaitReady waits for the guest's "ready" line after boot and returns its
// boot id.
func (c *Console) WaitReady(ctx context.Context) (string, error) {
	for {
		select {
		case f := <-c.res:
			if len(f) >= 3 && f[0] == "0" && f[1] == "ready" {
				return f[2], nil
			}
		case <-c.done:
			return "", c.err
		case <-ctx.Done():
			return "", fmt.Errorf("guest: waiting for boot: %w", ctx.Err())
		}
	}
}

// Command sends "ID CMD ARG" and returns the guest's answer.
func (c *Console) Command(ctx context.Context, cmd, arg string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	id := strconv.Itoa(c.next)
	c.next++
	if _, err := fmt.Fprintf(c.c, "%s %s %s\n", id, cmd, arg); err != nil {
		return "", fmt.Errorf("guest: send %s: %w", cmd, err)
	}
	// Resend now and then, in case the line was lost (typed before the
	// guest's read loop ran); the guest's commands are idempotent and a
	// late duplicate answer is ignored (its id is old).
	tick := time.NewTicker(15 * time.Second)
	defer tick.Stop()
	for {
		select {
		case f := <-c.res:
			if len(f) >= 2 && f[0] == id && f[1] == cmd {
				return strings.Join(f[2:], " "), nil
			}
		case <-tick.C:
			fmt.Fprintf(c.c, "%s %s %s\n", id, cmd, arg)
		case <-c.done:
			return "", c.err
		case <-ctx.Done():
			return "", fmt.Errorf("guest: %s: no answer: %w", cmd, ctx.Err())
		}
	}
}

// Close closes the connection.
func (c *Console) Close() error { return c.c.Close() }
