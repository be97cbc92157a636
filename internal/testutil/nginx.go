package testutil

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Nginx is an nginx serving a directory on a loopback port, started by a
// test with its own configuration (no daemon, every file in a temp dir).
type Nginx struct {
	URL  string // http://127.0.0.1:PORT
	Root string // the directory it serves
	cmd  *exec.Cmd
	done chan struct{}
	dir  string
}

// StartNginx serves root with nginx on a free loopback port until the test
// ends (or Stop/Kill). Without an nginx binary it skips with a reason
// (UFFDRESTORE_STRICT=1 makes that a failure): install Debian's nginx-light.
func StartNginx(t testing.TB, root string) *Nginx {
	t.Helper()
	bin, err := exec.LookPath("nginx")
	if err != nil {
		for _, p := range []string{"/usr/sbin/nginx", "/usr/local/sbin/nginx"} {
			if _, e := os.Stat(p); e == nil {
				bin, err = p, nil
				break
			}
		}
	}
	if err != nil {
		Skip(t, "no nginx binary (apt-get install nginx-light): %v", err)
	}
	dir := t.TempDir()
	for _, d := range []string{"tmp", "logs"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	var lastErr string
	for try := 0; try < 5; try++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		conf := filepath.Join(dir, "nginx.conf")
		tmp := filepath.Join(dir, "tmp")
		cfg := fmt.Sprintf(`daemon off;
master_process off;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/logs/error.log warn;
events { worker_connections 256; }
http {
	access_log off;
	client_body_temp_path %[2]s/body;
	proxy_temp_path %[2]s/proxy;
	fastcgi_temp_path %[2]s/fastcgi;
	uwsgi_temp_path %[2]s/uwsgi;
	scgi_temp_path %[2]s/scgi;
	types { application/octet-stream snap; }
	default_type application/octet-stream;
	keepalive_requests 100000;
	server {
		listen 127.0.0.1:%[3]d;
		root %[4]s;
		location / { }
	}
}
`, dir, tmp, port, root)
		if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "-p", dir, "-c", conf, "-e", filepath.Join(dir, "logs", "error.log"))
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatalf("start nginx: %v", err)
		}
		n := &Nginx{URL: fmt.Sprintf("http://127.0.0.1:%d", port), Root: root, cmd: cmd, done: make(chan struct{}), dir: dir}
		go func() { cmd.Wait(); close(n.done) }()
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			select {
			case <-n.done:
				log, _ := os.ReadFile(filepath.Join(dir, "logs", "error.log"))
				lastErr = fmt.Sprintf("nginx exited: %s %s", out.String(), log)
			default:
			}
			if lastErr != "" {
				break
			}
			if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second); err == nil {
				c.Close()
				t.Cleanup(n.Kill)
				return n
			}
			time.Sleep(20 * time.Millisecond)
		}
		if lastErr == "" {
			n.Kill()
			t.Fatalf("nginx did not listen on port %d within 10s", port)
		}
		if !strings.Contains(lastErr, "Address already in use") {
			break
		}
	}
	t.Fatalf("start nginx: %s", lastErr)
	return nil
}

// Kill stops nginx at once (SIGKILL) and waits for it to exit: the server
// dies, connections in flight are cut. Later calls do nothing.
func (n *Nginx) Kill() {
	select {
	case <-n.done:
		return
	default:
	}
	n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.done
}
