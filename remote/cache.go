package remote

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"
)

// CacheEnv names the default cache directory (Options.CacheDir) and
// CacheMaxEnv its default size bound in bytes (Options.CacheMax).
const (
	CacheEnv    = "UFFDRESTORE_REMOTE_CACHE"
	CacheMaxEnv = "UFFDRESTORE_REMOTE_CACHE_MAX"
)

// DefaultCacheMax bounds a cache directory when neither Options.CacheMax
// nor UFFDRESTORE_REMOTE_CACHE_MAX says otherwise.
const DefaultCacheMax = 4 << 30

// cache keeps the byte ranges of one snapshot version fetched so far, on
// disk: dir/<key>/data is a sparse file of the snapshot's size holding them
// at their offsets, dir/<key>/ranges an append-only log of the ranges
// (offset, length: two little-endian u64), each appended after its bytes
// are written. The key hashes the URL and the pinned validator, so a
// replaced snapshot gets a new entry and never reads the old one's bytes.
// Bytes from the cache are checked like any others (chunk checksums).
type cache struct {
	dir  string // this entry
	max  int64
	data *os.File
	log  *os.File

	mu     sync.Mutex
	have   []span // sorted, merged
	bytes  int64  // bytes in have
	full   bool   // the bound is reached: cache no more
	hits   int64
	hitLen int64
}

type span struct{ off, end int64 }

func cacheKey(url, validator string) string {
	h := sha256.Sum256([]byte(url + "\n" + validator))
	return hex.EncodeToString(h[:16])
}

// openCache opens (or creates) the entry for this snapshot version in root
// and evicts the least recently used other entries beyond max bytes.
func openCache(root string, max int64, url, validator string, size int64) (*cache, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("remote snapshot: cache directory: %w", err)
	}
	dir := filepath.Join(root, cacheKey(url, validator))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("remote snapshot: cache directory: %w", err)
	}
	now := time.Now()
	os.Chtimes(dir, now, now) // most recently used
	c := &cache{dir: dir, max: max}
	var err error
	if c.data, err = os.OpenFile(filepath.Join(dir, "data"), os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return nil, fmt.Errorf("remote snapshot: cache: %w", err)
	}
	if c.log, err = os.OpenFile(filepath.Join(dir, "ranges"), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600); err != nil {
		c.data.Close()
		return nil, fmt.Errorf("remote snapshot: cache: %w", err)
	}
	b, err := io.ReadAll(c.log)
	if err != nil {
		c.close()
		return nil, fmt.Errorf("remote snapshot: cache: %w", err)
	}
	for ; len(b) >= 16; b = b[16:] { // a torn last record is ignored
		off, n := int64(binary.LittleEndian.Uint64(b)), int64(binary.LittleEndian.Uint64(b[8:]))
		if off >= 0 && n > 0 && off+n <= size && off+n > off {
			c.add(off, off+n)
		}
	}
	if st, err := c.data.Stat(); err == nil && st.Size() != size {
		if err := c.data.Truncate(size); err != nil {
			c.close()
			return nil, fmt.Errorf("remote snapshot: cache: %w", err)
		}
	}
	evict(root, filepath.Base(dir), max)
	c.full = c.bytes >= max
	return c, nil
}

// evict removes the least recently used entries of root other than keep
// while the entries hold more than max bytes.
func evict(root, keep string, max int64) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return
	}
	type entry struct {
		name  string
		used  time.Time
		bytes int64
	}
	var es []entry
	var total int64
	for _, e := range ents {
		if !e.IsDir() || len(e.Name()) != 32 {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		var n int64
		if st, err := os.Stat(filepath.Join(root, e.Name(), "data")); err == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok {
				n = sys.Blocks * 512 // allocated, not the sparse size
			}
		}
		total += n
		es = append(es, entry{e.Name(), fi.ModTime(), n})
	}
	sort.Slice(es, func(i, j int) bool { return es[i].used.Before(es[j].used) })
	for _, e := range es {
		if total <= max {
			break
		}
		if e.name == keep {
			continue
		}
		if os.RemoveAll(filepath.Join(root, e.name)) == nil {
			total -= e.bytes
		}
	}
}

func (c *cache) close() {
	c.data.Close()
	c.log.Close()
}

// add merges [off, end) into have. c.mu held (or not shared yet).
func (c *cache) add(off, end int64) {
	i := sort.Search(len(c.have), func(i int) bool { return c.have[i].end >= off })
	j := i
	for j < len(c.have) && c.have[j].off <= end {
		off, end = min(off, c.have[j].off), max(end, c.have[j].end)
		c.bytes -= c.have[j].end - c.have[j].off
		j++
	}
	c.have = slices.Replace(c.have, i, j, span{off, end})
	c.bytes += end - off
}

// get fills p from the cache if it holds all of [off, off+len(p)).
func (c *cache) get(p []byte, off int64) bool {
	end := off + int64(len(p))
	c.mu.Lock()
	i := sort.Search(len(c.have), func(i int) bool { return c.have[i].end >= end })
	ok := i < len(c.have) && c.have[i].off <= off
	c.mu.Unlock()
	if !ok {
		return false
	}
	if n, err := c.data.ReadAt(p, off); n != len(p) || (err != nil && !errors.Is(err, io.EOF)) {
		return false
	}
	c.mu.Lock()
	c.hits++
	c.hitLen += int64(len(p))
	c.mu.Unlock()
	return true
}

// put stores p, the bytes at off, unless the bound is reached. Failures
// only mean the range is not cached.
func (c *cache) put(p []byte, off int64) {
	c.mu.Lock()
	full := c.full
	c.mu.Unlock()
	if full || len(p) == 0 {
		return
	}
	if _, err := c.data.WriteAt(p, off); err != nil {
		return
	}
	var rec [16]byte
	binary.LittleEndian.PutUint64(rec[:], uint64(off))
	binary.LittleEndian.PutUint64(rec[8:], uint64(len(p)))
	if _, err := c.log.Write(rec[:]); err != nil {
		return
	}
	c.mu.Lock()
	c.add(off, off+int64(len(p)))
	c.full = c.bytes >= c.max
	c.mu.Unlock()
}
