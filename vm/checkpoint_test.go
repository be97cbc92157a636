package vm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeQMP is a scripted QMP server: replies maps a command to its reply
// body (`"return": ...` or `"error": ...`); every command is recorded.
type fakeQMP struct {
	mu   sync.Mutex
	cmds []string
}

func (f *fakeQMP) serve(t *testing.T, replies map[string]string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte(`{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 3}, "package": ""}, "capabilities": []}}` + "\n"))
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			var m struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			json.Unmarshal(line, &m)
			f.mu.Lock()
			f.cmds = append(f.cmds, m.Execute)
			f.mu.Unlock()
			body, ok := replies[m.Execute]
			if !ok {
				body = `"return": {}`
			}
			c.Write([]byte(`{` + body + `, "id": ` + string(m.ID) + "}\n"))
		}
	}()
	return p
}

func (f *fakeQMP) commands() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.cmds...)
}

func fakeVM(t *testing.T, caps string) (map[string]string, string) {
	ram := filepath.Join(t.TempDir(), "vm.ram")
	if err := os.WriteFile(ram, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	return map[string]string{
		"query-status":               `"return": {"status": "running", "running": true}`,
		"query-memdev":               `"return": [{"id": "mem", "size": 1048576, "share": true, "merge": true, "dump": true, "prealloc": false, "policy": "default", "host-nodes": []}]`,
		"qom-list":                   `"return": [{"name": "mem", "type": "child<memory-backend-file>"}]`,
		"qom-get":                    `"return": "` + ram + `"`,
		"query-migrate-capabilities": `"return": [` + caps + `]`,
	}, ram
}

// A QEMU without x-ignore-shared: named error, and the VM is never stopped.
func TestCheckpointNoIgnoreShared(t *testing.T) {
	replies, _ := fakeVM(t, `{"capability": "xbzrle", "state": false}`)
	var f fakeQMP
	p := f.serve(t, replies)
	out := filepath.Join(t.TempDir(), "vm.snap")
	_, err := Checkpoint(context.Background(), CheckpointOptions{QMP: p, Output: out})
	if !errors.Is(err, ErrNoIgnoreShared) || !strings.Contains(err.Error(), "QEMU 3.0.0") {
		t.Fatalf("%v, want ErrNoIgnoreShared naming the version", err)
	}
	for _, c := range f.commands() {
		if c == "stop" || c == "migrate" {
			t.Errorf("sent %s to a QEMU that cannot checkpoint", c)
		}
	}
}

// A migration that fails after the VM was stopped: the VM is resumed, the
// error says so, and no snapshot is left.
func TestCheckpointFailureResumes(t *testing.T) {
	replies, _ := fakeVM(t, `{"capability": "x-ignore-shared", "state": false}`)
	replies["migrate"] = `"error": {"class": "GenericError", "desc": "There's a migration process in progress"}`
	var f fakeQMP
	p := f.serve(t, replies)
	out := filepath.Join(t.TempDir(), "vm.snap")
	_, err := Checkpoint(context.Background(), CheckpointOptions{QMP: p, Output: out, Timeout: 5 * time.Second})
	if !errors.Is(err, ErrMigration) || !strings.Contains(err.Error(), "the VM was resumed") {
		t.Fatalf("%v, want ErrMigration saying the VM was resumed", err)
	}
	cmds := strings.Join(f.commands(), " ")
	if !strings.Contains(cmds, "migrate-set-capabilities") || !strings.Contains(cmds, "stop") || !strings.HasSuffix(cmds, "cont") {
		t.Errorf("commands %s: want x-ignore-shared set, stop ... cont", cmds)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("failed checkpoint left %s: %v", out, err)
	}
	ents, _ := os.ReadDir(filepath.Dir(out))
	if len(ents) != 0 {
		t.Errorf("temporary files left: %v", ents)
	}
}

// RAM whose file is not the backend's size is refused before the VM stops.
func TestCheckpointRAMFileSize(t *testing.T) {
	replies, ram := fakeVM(t, `{"capability": "x-ignore-shared", "state": false}`)
	os.Truncate(ram, 4096)
	var f fakeQMP
	p := f.serve(t, replies)
	_, err := Checkpoint(context.Background(), CheckpointOptions{QMP: p, Output: filepath.Join(t.TempDir(), "vm.snap")})
	if !errors.Is(err, ErrRAMSize) {
		t.Fatalf("%v, want ErrRAMSize", err)
	}
}
