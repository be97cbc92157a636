package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func testData(n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(int64(n))).Read(b)
	return b
}

// file is a file on a test server that can be replaced.
type file struct {
	mu      sync.Mutex
	data    []byte
	etag    string
	modTime time.Time
}

func (f *file) set(data []byte, etag string, mod time.Time) {
	f.mu.Lock()
	f.data, f.etag, f.modTime = data, etag, mod
	f.mu.Unlock()
}

// serve serves the file with net/http's ranges and conditionals.
func (f *file) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	data, etag, mod := f.data, f.etag, f.modTime
	f.mu.Unlock()
	if etag != "" {
		w.Header().Set("ETag", etag)
	}
	http.ServeContent(w, r, "app.snap", mod, bytes.NewReader(data))
}

func newFile(data []byte) *file {
	return &file{data: data, etag: `"v1"`, modTime: time.Unix(1700000000, 0)}
}

func quick() Options {
	return Options{Timeout: 2 * time.Second, Retries: 2, Backoff: 5 * time.Millisecond}
}

// TestRangedReads: random ranged reads return the file's bytes, a read past
// the end returns io.EOF with the bytes before it, and the reader fetches
// only what was asked (plus the first 4 KiB).
func TestRangedReads(t *testing.T) {
	data := testData(1<<20 + 123)
	srv := httptest.NewServer(http.HandlerFunc(newFile(data).serve))
	defer srv.Close()
	r, err := Open(context.Background(), srv.URL+"/app.snap", quick())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Size() != int64(len(data)) {
		t.Fatalf("size %d, want %d", r.Size(), len(data))
	}
	rng := rand.New(rand.NewSource(1))
	var asked int64
	for i := 0; i < 200; i++ {
		off := rng.Int63n(int64(len(data)))
		n := rng.Intn(200 << 10)
		p := make([]byte, n)
		k, err := r.ReadAt(p, off)
		end := min(off+int64(n), int64(len(data)))
		if int64(k) != end-off || (end < off+int64(n)) != (err == io.EOF) || (err != nil && err != io.EOF) {
			t.Fatalf("ReadAt(%d, %d) = %d, %v", n, off, k, err)
		}
		if !bytes.Equal(p[:k], data[off:end]) {
			t.Fatalf("ReadAt(%d, %d): wrong bytes", n, off)
		}
		if end > headWindow {
			asked += end - off
		}
	}
	if k, err := r.ReadAt(make([]byte, 10), int64(len(data))); k != 0 || err != io.EOF {
		t.Errorf("read at the end: %d, %v", k, err)
	}
	st := r.Stats()
	if st.BytesFetched != asked+headWindow {
		t.Errorf("fetched %d bytes, want the %d asked for plus the %d of the first request", st.BytesFetched, asked, headWindow)
	}
	if st.Retries != 0 || st.Requests == 0 {
		t.Errorf("stats %+v", st)
	}
}

// TestNamedErrors: 404, a server ignoring Range, a replaced file (ETag and
// Last-Modified validators, with a server that honours If-Match and with
// one that ignores it), no validator: each a named error.
func TestNamedErrors(t *testing.T) {
	data := testData(64 << 10)
	ctx := context.Background()

	t.Run("404", func(t *testing.T) {
		srv := httptest.NewServer(http.NotFoundHandler())
		defer srv.Close()
		_, err := Open(ctx, srv.URL+"/nope.snap", quick())
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("got %v, want ErrNotFound", err)
		}
	})
	t.Run("no-range", func(t *testing.T) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(data) }))
		defer srv.Close()
		_, err := Open(ctx, srv.URL+"/app.snap", quick())
		if !errors.Is(err, ErrNoRange) {
			t.Fatalf("got %v, want ErrNoRange", err)
		}
	})
	t.Run("wrong-range", func(t *testing.T) {
		f := newFile(data)
		var n atomic.Int32
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if n.Add(1) > 1 {
				r.Header.Set("Range", "bytes=0-99") // answers another range than asked
			}
			f.serve(w, r)
		}))
		defer srv.Close()
		r, err := Open(ctx, srv.URL+"/app.snap", quick())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := r.ReadAt(make([]byte, 100), 10000); !errors.Is(err, ErrNoRange) {
			t.Fatalf("got %v, want ErrNoRange", err)
		}
	})
	t.Run("status", func(t *testing.T) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "no", http.StatusForbidden)
		}))
		defer srv.Close()
		if _, err := Open(ctx, srv.URL+"/app.snap", quick()); !errors.Is(err, ErrHTTP) {
			t.Fatalf("got %v, want ErrHTTP", err)
		}
	})
	t.Run("no-validator", func(t *testing.T) {
		f := newFile(data)
		f.set(data, "", time.Time{})
		srv := httptest.NewServer(http.HandlerFunc(f.serve))
		defer srv.Close()
		if _, err := Open(ctx, srv.URL+"/app.snap", quick()); !errors.Is(err, ErrNoValidator) {
			t.Fatalf("got %v, want ErrNoValidator", err)
		}
		o := quick()
		o.AllowNoValidator = true
		if _, err := Open(ctx, srv.URL+"/app.snap", o); err != nil {
			t.Fatalf("AllowNoValidator: %v", err)
		}
	})
	for _, c := range []struct {
		name     string
		etag     bool // the server sends an ETag (else only Last-Modified)
		ignoreIf bool // the server ignores If-Match / If-Unmodified-Since
	}{{"etag", true, false}, {"etag-ignored", true, true}, {"lastmod", false, false}, {"lastmod-ignored", false, true}} {
		t.Run("replaced-"+c.name, func(t *testing.T) {
			f := newFile(data)
			if !c.etag {
				f.set(data, "", f.modTime)
			}
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if c.ignoreIf {
					r.Header.Del("If-Match")
					r.Header.Del("If-Unmodified-Since")
				}
				f.serve(w, r)
			}))
			defer srv.Close()
			r, err := Open(ctx, srv.URL+"/app.snap", quick())
			if err != nil {
				t.Fatal(err)
			}
			p := make([]byte, 1000)
			if _, err := r.ReadAt(p, 20000); err != nil || !bytes.Equal(p, data[20000:21000]) {
				t.Fatalf("read before the replacement: %v", err)
			}
			other := testData(64<<10 + 1)[:64<<10] // same size, other bytes
			etag := ""
			if c.etag {
				etag = `"v2"`
			}
			f.set(other, etag, f.modTime.Add(time.Minute))
			if _, err := r.ReadAt(p, 30000); !errors.Is(err, ErrChanged) {
				t.Fatalf("read after the replacement: %v, want ErrChanged", err)
			}
			// A second reader pinned to the first version refuses the new one.
			o := quick()
			o.Validator = r.Validator()
			if _, err := Open(ctx, srv.URL+"/app.snap", o); !errors.Is(err, ErrChanged) {
				t.Fatalf("pinned open after the replacement: %v, want ErrChanged", err)
			}
		})
	}
	t.Run("resized", func(t *testing.T) {
		// Same ETag, other size: a server that reuses ETags across versions.
		f := newFile(data)
		srv := httptest.NewServer(http.HandlerFunc(f.serve))
		defer srv.Close()
		r, err := Open(ctx, srv.URL+"/app.snap", quick())
		if err != nil {
			t.Fatal(err)
		}
		f.set(append(append([]byte(nil), data...), 1, 2, 3), `"v1"`, f.modTime)
		if _, err := r.ReadAt(make([]byte, 10), 20000); !errors.Is(err, ErrChanged) {
			t.Fatalf("got %v, want ErrChanged", err)
		}
	})
}

// TestRetries: 5xx answers and connections reset mid-body are retried with
// back-off and the read succeeds; a server that always fails gives
// ErrUnavailable after Retries+1 attempts.
func TestRetries(t *testing.T) {
	data := testData(256 << 10)
	f := newFile(data)
	var fails atomic.Int32 // requests still to fail
	var mode atomic.Int32  // 0: 503, 1: reset mid-body
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if fails.Add(-1) >= 0 {
			if mode.Load() == 0 {
				http.Error(w, "busy", http.StatusServiceUnavailable)
				return
			}
			// Half the body, then a reset connection.
			w.Header().Set("Content-Length", "100000")
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 100000-199999/%d", len(data)))
			w.Header().Set("ETag", `"v1"`)
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data[100000:150000])
			w.(http.Flusher).Flush()
			c, _, _ := w.(http.Hijacker).Hijack()
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
			return
		}
		f.serve(w, r)
	}))
	defer srv.Close()
	r, err := Open(context.Background(), srv.URL+"/app.snap", quick())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []int32{0, 1} {
		mode.Store(m)
		fails.Store(2)
		before := r.Stats().Retries
		p := make([]byte, 100000)
		if _, err := r.ReadAt(p, 100000); err != nil || !bytes.Equal(p, data[100000:200000]) {
			t.Fatalf("mode %d: read after 2 failures: %v", m, err)
		}
		if got := r.Stats().Retries - before; got != 2 {
			t.Errorf("mode %d: %d retries, want 2", m, got)
		}
		fails.Store(100)
		t0 := time.Now()
		_, err := r.ReadAt(p, 100000)
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("mode %d: got %v, want ErrUnavailable", m, err)
		}
		// Back-off 5, 10 ms: the attempts were spaced, not hammered.
		if el := time.Since(t0); el < 15*time.Millisecond {
			t.Errorf("mode %d: 3 attempts in %v: no back-off", m, el)
		}
	}
}

// TestSlowServer: a server slower than Timeout gives ErrTimeout (and
// ErrUnavailable once the retries are spent), in about (Retries+1)*Timeout,
// never a hang.
func TestSlowServer(t *testing.T) {
	data := testData(64 << 10)
	f := newFile(data)
	var slow atomic.Bool
	stop := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if slow.Load() {
			select {
			case <-stop:
			case <-r.Context().Done():
			}
			return
		}
		f.serve(w, r)
	}))
	defer srv.Close()
	defer close(stop)
	o := Options{Timeout: 100 * time.Millisecond, Retries: 1, Backoff: time.Millisecond}
	r, err := Open(context.Background(), srv.URL+"/app.snap", o)
	if err != nil {
		t.Fatal(err)
	}
	slow.Store(true)
	t0 := time.Now()
	_, err = r.ReadAt(make([]byte, 100), 30000)
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, ErrUnavailable) {
		t.Fatalf("got %v, want ErrTimeout and ErrUnavailable", err)
	}
	if el := time.Since(t0); el > 5*time.Second {
		t.Errorf("took %v", el)
	}
	if _, err := Open(context.Background(), srv.URL+"/app.snap", o); !errors.Is(err, ErrTimeout) {
		t.Fatalf("open of a slow server: %v, want ErrTimeout", err)
	}
}

// TestCoalesceAndParallel: at most Parallel requests are in flight; reads
// queued behind them whose ranges touch are served by one request.
func TestCoalesceAndParallel(t *testing.T) {
	data := testData(1 << 20)
	f := newFile(data)
	var inflight, peak atomic.Int32
	gate := make(chan struct{})
	var gated atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := inflight.Add(1)
		defer inflight.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		if gated.Load() {
			<-gate
		}
		f.serve(w, r)
	}))
	defer srv.Close()
	o := quick()
	o.Parallel = 2
	r, err := Open(context.Background(), srv.URL+"/app.snap", o)
	if err != nil {
		t.Fatal(err)
	}
	gated.Store(true)
	const reads = 34 // 2 block the slots, 32 queue up: 16 pairs of neighbours
	var wg sync.WaitGroup
	errs := make(chan error, reads)
	read := func(off int64, n int) {
		defer wg.Done()
		p := make([]byte, n)
		if _, err := r.ReadAt(p, off); err != nil {
			errs <- err
		} else if !bytes.Equal(p, data[off:off+int64(n)]) {
			errs <- fmt.Errorf("read %d at %d: wrong bytes", n, off)
		}
	}
	wg.Add(2)
	go read(8192, 1000)
	go read(500000, 1000)
	for deadline := time.Now().Add(5 * time.Second); inflight.Load() < 2 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	for i := 0; i < reads-2; i++ {
		wg.Add(1)
		// Pairs: [x, x+4096) and [x+4096, x+8192), pairs 16 KiB apart.
		go read(int64(16384+(i/2)*16384+(i%2)*4096), 4096)
	}
	for deadline := time.Now().Add(5 * time.Second); ; {
		r.mu.Lock()
		q := len(r.queue)
		r.mu.Unlock()
		if q == reads-2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	st := r.Stats()
	if peak.Load() > 2 {
		t.Errorf("%d requests in flight, Parallel is 2", peak.Load())
	}
	if st.Coalesced != 16 {
		t.Errorf("%d reads coalesced, want 16 (one per pair of neighbours); stats %+v", st.Coalesced, st)
	}
}

func TestIsURL(t *testing.T) {
	for s, want := range map[string]bool{"http://h/a": true, "HTTPS://h/a": true, "/tmp/a.snap": false, "a.snap": false, "s3://b/k": false} {
		if IsURL(s) != want {
			t.Errorf("IsURL(%q) = %v", s, !want)
		}
	}
	if _, err := Open(context.Background(), "http:///nohost", quick()); err == nil {
		t.Error("a URL without a host opened")
	}
}

// TestCache: with a cache directory, a second reader of the same snapshot
// version reads every range it read before from disk (only the first 4 KiB
// come from the server); a replaced snapshot is a new entry and reads the
// new bytes; the directory's bound evicts the least recently used version.
func TestCache(t *testing.T) {
	data := testData(1 << 20)
	f := newFile(data)
	srv := httptest.NewServer(http.HandlerFunc(f.serve))
	defer srv.Close()
	dir := t.TempDir()
	o := quick()
	o.CacheDir = dir
	type rng struct{ off, n int64 }
	var rs []rng
	rg := rand.New(rand.NewSource(3))
	for i := 0; i < 50; i++ {
		rs = append(rs, rng{headWindow + rg.Int63n(int64(len(data))-headWindow-70000), 1 + rg.Int63n(65536)})
	}
	readAll := func(want []byte) Stats {
		t.Helper()
		r, err := Open(context.Background(), srv.URL+"/app.snap", o)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		for _, x := range rs {
			p := make([]byte, x.n)
			if _, err := r.ReadAt(p, x.off); err != nil || !bytes.Equal(p, want[x.off:x.off+x.n]) {
				t.Fatalf("read %d at %d: %v (or wrong bytes)", x.n, x.off, err)
			}
		}
		// A part of a cached range is in the cache too.
		p := make([]byte, 100)
		if _, err := r.ReadAt(p, rs[0].off); err != nil || !bytes.Equal(p, want[rs[0].off:rs[0].off+100]) {
			t.Fatalf("sub-range: %v", err)
		}
		return r.Stats()
	}
	first := readAll(data)
	if first.BytesFetched <= headWindow {
		t.Fatalf("first reader: %+v", first)
	}
	// A torn last record in the log (a crash while appending) is ignored.
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("%d cache entries, want 1", len(ents))
	}
	lf, err := os.OpenFile(filepath.Join(dir, ents[0].Name(), "ranges"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	lf.Write([]byte{1, 2, 3, 4, 5})
	lf.Close()
	second := readAll(data)
	if second.BytesFetched != headWindow || second.CacheHits != int64(len(rs)+1) {
		t.Fatalf("second reader fetched %d bytes (want only the first %d) with %d cache hits: %+v", second.BytesFetched, headWindow, second.CacheHits, second)
	}
	// Replaced: another version, so another entry, and the new bytes.
	other := testData(1<<20 + 7)[:1<<20]
	f.set(other, `"v2"`, f.modTime.Add(time.Minute))
	o.CacheMax = 1 // evicts the first version when the second opens
	third := readAll(other)
	if third.BytesFetched <= headWindow {
		t.Fatalf("reader of the new version: %+v", third)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("%d cache entries with a 1-byte bound, want only the one in use", len(ents))
	}
}
