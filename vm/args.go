package vm

import (
	"fmt"
	"strings"
)

// qemuOpts is a QEMU option string "type,key=value,..." (",," escapes a
// comma), kept in order so that it can be written back.
type qemuOpts struct {
	keys, vals []string // key "" = the implied first value (the type)
}

func parseQemuOpts(s string) qemuOpts {
	var o qemuOpts
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	parts = append(parts, cur.String())
	for i, p := range parts {
		k, v, ok := strings.Cut(p, "=")
		if !ok {
			if i == 0 {
				k, v = "", p
			} else {
				k, v = p, "on" // a bare flag
			}
		}
		o.keys = append(o.keys, k)
		o.vals = append(o.vals, v)
	}
	return o
}

func (o qemuOpts) get(k string) (string, bool) {
	for i, key := range o.keys {
		if key == k {
			return o.vals[i], true
		}
	}
	return "", false
}

func (o *qemuOpts) set(k, v string) {
	for i, key := range o.keys {
		if key == k {
			o.vals[i] = v
			return
		}
	}
	o.keys = append(o.keys, k)
	o.vals = append(o.vals, v)
}

func (o qemuOpts) typ() string {
	if v, ok := o.get("qom-type"); ok {
		return v
	}
	v, _ := o.get("")
	return v
}

func (o qemuOpts) String() string {
	var b strings.Builder
	for i, k := range o.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		v := strings.ReplaceAll(o.vals[i], ",", ",,")
		if k == "" {
			b.WriteString(v)
		} else {
			b.WriteString(k + "=" + v)
		}
	}
	return b.String()
}

// ramRegion is one RAM region of a snapshot and the marker QEMU maps it by.
type ramRegion struct {
	ID     string
	Size   uint64
	Marker string
}

// rewriteArgs makes the user's QEMU arguments restore the snapshot: each
// memory-backend-file whose id names a snapshot RAM region gets
// mem-path=<marker> and share=on (share=off with private), after checking
// its size; -incoming defer, -S (we cont) and our QMP socket are added.
func rewriteArgs(args []string, regions []ramRegion, private bool, qmpPath string) ([]string, error) {
	out := make([]string, 0, len(args)+6)
	found := map[string]bool{}
	share := "on"
	if private {
		share = "off"
	}
	for i := 0; i < len(args); i++ {
		a := args[i]
		flag := strings.TrimPrefix(a, "-")
		flag = strings.TrimPrefix(flag, "-")
		if !strings.HasPrefix(a, "-") {
			out = append(out, a)
			continue
		}
		switch flag {
		case "incoming":
			return nil, fmt.Errorf("%w: remove %s: vm restore adds -incoming defer itself", ErrArgs, a)
		case "daemonize":
			return nil, fmt.Errorf("%w: remove -daemonize: vm restore must run QEMU as its child", ErrArgs)
		case "mem-path":
			return nil, fmt.Errorf("%w: -mem-path: give the RAM as %s", ErrArgs, fileBackendArgs(regions[0].ID, regions[0].Size))
		case "object":
			if i+1 >= len(args) {
				return nil, fmt.Errorf("%w: %s without a value", ErrArgs, a)
			}
			i++
			o := parseQemuOpts(args[i])
			id, _ := o.get("id")
			var r *ramRegion
			for k := range regions {
				if regions[k].ID == id {
					r = &regions[k]
				}
			}
			t := o.typ()
			if r == nil {
				if t == "memory-backend-file" {
					return nil, fmt.Errorf("%w: -object %s: the snapshot has no RAM region %q (its RAM: %s)", ErrArgs, args[i], id, regionList(regions))
				}
				out = append(out, a, args[i])
				continue
			}
			if t != "memory-backend-file" {
				return nil, fmt.Errorf("%w: backend %q is a %s: restore it as %s", ErrArgs, id, t, fileBackendArgs(id, r.Size))
			}
			if sz, ok := o.get("size"); ok {
				n, err := parseSize(sz)
				if err != nil {
					return nil, fmt.Errorf("%w: backend %q: size: %v", ErrArgs, id, err)
				}
				if n != r.Size {
					return nil, fmt.Errorf("%w: backend %q has size=%s (%d bytes) on the command line, the snapshot's RAM is %d bytes: give size=%s",
						ErrRAMSize, id, sz, n, r.Size, sizeArg(r.Size))
				}
			} else {
				o.set("size", sizeArg(r.Size))
			}
			o.set("mem-path", r.Marker)
			o.set("share", share)
			found[id] = true
			out = append(out, a, o.String())
		default:
			out = append(out, a)
		}
	}
	for _, r := range regions {
		if !found[r.ID] {
			return nil, fmt.Errorf("%w: no RAM backend %q: add %s (mem-path is replaced by the served snapshot)", ErrArgs, r.ID, fileBackendArgs(r.ID, r.Size))
		}
	}
	out = append(out, "-incoming", "defer", "-S", "-qmp", "unix:"+qmpPath+",server=on,wait=off")
	return out, nil
}

func regionList(rs []ramRegion) string {
	var s []string
	for _, r := range rs {
		s = append(s, fmt.Sprintf("%q (%s)", r.ID, sizeArg(r.Size)))
	}
	return strings.Join(s, ", ")
}
