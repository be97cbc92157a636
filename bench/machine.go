package bench

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Machine says where a benchmark ran.
type Machine struct {
	CPU           string  `json:"cpu"`
	Cores         int     `json:"cores"`
	Kernel        string  `json:"kernel"`
	GoVersion     string  `json:"go"`
	MemTotalMiB   int64   `json:"mem_total_mib"`
	HugePageKiB   int64   `json:"huge_page_kib"`
	HugePagesTot  int64   `json:"huge_pages_total"`
	HugePagesFree int64   `json:"huge_pages_free"`
	THP           string  `json:"transparent_hugepage"`
	Load1         float64 `json:"load1"`
	Time          string  `json:"time"`
}

// ThisMachine describes the machine we run on.
func ThisMachine() Machine {
	m := Machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version(), Time: time.Now().UTC().Format(time.RFC3339)}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	mi := Meminfo()
	m.MemTotalMiB = mi["MemTotal"] >> 10
	m.HugePageKiB = mi["Hugepagesize"]
	m.HugePagesTot = mi["HugePages_Total"]
	m.HugePagesFree = mi["HugePages_Free"]
	if b, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled"); err == nil {
		s := string(b)
		if i, j := strings.Index(s, "["), strings.Index(s, "]"); i >= 0 && j > i {
			m.THP = s[i+1 : j]
		}
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			m.Load1, _ = strconv.ParseFloat(f[0], 64)
		}
	}
	return m
}

// String is a one-line description.
func (m Machine) String() string {
	cpu := m.CPU
	if cpu == "" {
		cpu = "unknown CPU"
	}
	return fmt.Sprintf("%s, %d cores, Linux %s, %d MiB RAM, huge pages %d x %d KiB (%d free), THP %s, %s, load %.2f",
		cpu, m.Cores, m.Kernel, m.MemTotalMiB, m.HugePagesTot, m.HugePageKiB, m.HugePagesFree, m.THP, m.GoVersion, m.Load1)
}

// Meminfo returns /proc/meminfo's fields (kB for sizes, counts as is).
func Meminfo() map[string]int64 {
	out := map[string]int64{}
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return out
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		out[k] = n
	}
	return out
}

// procStatusKiB reads a "Name:  N kB" field of /proc/PID/status (pid 0:
// self).
func procStatusKiB(pid int, field string) int64 {
	p := "/proc/self/status"
	if pid > 0 {
		p = "/proc/" + strconv.Itoa(pid) + "/status"
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == field {
			if f := strings.Fields(v); len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n
			}
		}
	}
	return 0
}

// resetPeakRSS resets this process's VmHWM to its current RSS.
func resetPeakRSS() { os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) }

// cpuNS returns the CPU time (ns) every thread of pid has run, from
// /proc/PID/task/*/schedstat (nanosecond resolution, unlike the 10 ms ticks
// of /proc/PID/stat).
func cpuNS(pid int) int64 {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	var sum int64
	for _, e := range ents {
		b, err := os.ReadFile(dir + "/" + e.Name() + "/schedstat")
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) > 0 {
			n, _ := strconv.ParseInt(f[0], 10, 64)
			sum += n
		}
	}
	return sum
}

// childrenNamed lists this process's live children whose argv[0] is name.
// (CONFIG_PROC_CHILDREN is not always set, so /proc is scanned.)
func childrenNamed(name string) []int {
	me := os.Getpid()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, cut at the last ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 2 {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); ppid != me {
			continue
		}
		cl, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		arg0, _, _ := strings.Cut(string(cl), "\x00")
		if arg0 == name {
			out = append(out, pid)
		}
	}
	return out
}

// rusage returns user and system CPU time (ns) and minor faults of who.
func rusage(who int) (user, sys, minflt int64) {
	var ru unix.Rusage
	if unix.Getrusage(who, &ru) != nil {
		return 0, 0, 0
	}
	return ru.Utime.Nano(), ru.Stime.Nano(), ru.Minflt
}
