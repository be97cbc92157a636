// Package remote reads a snapshot stored on an HTTP(S) server through
// io.ReaderAt, with ranged GETs: the snapshot format is built for random
// access, so a lazy restore fetches only the chunks it touches.
//
// Every response is checked against the validator (ETag, else
// Last-Modified) and the size pinned by the first one, and every request
// after the first carries If-Match (or If-Unmodified-Since): a snapshot
// replaced on the server while it is read is refused with ErrChanged, never
// served as a mix of two files. Requests run at most Options.Parallel at a
// time; reads that queue up behind them are coalesced into one request when
// their ranges are neighbours. A request that fails with a 5xx status, a
// connection error or a timeout is retried with exponential back-off.
package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Errors, wrapped with the URL and the cause.
var (
	// ErrNotFound: the server answered 404 (or 410).
	ErrNotFound = errors.New("remote snapshot: not found on the server (HTTP 404): check the URL")
	// ErrNoRange: the server answered a ranged GET with the whole file (200)
	// or with another range: it does not serve byte ranges, so a lazy
	// restore cannot read it. Serve the file with a server that does
	// (nginx, any object store), or download it and restore the local copy.
	ErrNoRange = errors.New("remote snapshot: the server does not serve byte ranges")
	// ErrChanged: the snapshot's validator (ETag, Last-Modified) or size
	// changed since it was opened: it was replaced on the server. Bytes of
	// the new file are never used; restore again to read the new one.
	ErrChanged = errors.New("remote snapshot: the snapshot changed on the server while it was being read")
	// ErrNoValidator: the server sends neither ETag nor Last-Modified, so a
	// replaced snapshot could not be detected (Options.AllowNoValidator
	// accepts that risk).
	ErrNoValidator = errors.New("remote snapshot: the server sends neither ETag nor Last-Modified, so a replaced snapshot could not be detected")
	// ErrTimeout: a request (headers and body) took longer than
	// Options.Timeout, on every attempt.
	ErrTimeout = errors.New("remote snapshot: the server did not answer in time")
	// ErrUnavailable: a request failed on every attempt (5xx, connection
	// refused or reset, timeout).
	ErrUnavailable = errors.New("remote snapshot: the server failed on every attempt")
	// ErrHTTP: any other unexpected HTTP status (401, 403, ...).
	ErrHTTP = errors.New("remote snapshot: unexpected HTTP status")
)

// IsURL reports whether s names a remote snapshot (http:// or https://).
func IsURL(s string) bool {
	l := strings.ToLower(s)
	return strings.HasPrefix(l, "http://") || strings.HasPrefix(l, "https://")
}

// Options tune a Reader. The zero value gives the defaults.
type Options struct {
	Client   *http.Client  `json:"-"`        // default: a client with its own transport, no overall timeout
	Parallel int           `json:"parallel"` // requests in flight at once; default 8
	Timeout  time.Duration `json:"timeout"`  // per attempt, headers and body; default 30s
	Retries  int           `json:"retries"`  // further attempts after a retryable failure; default 4 (-1: none)
	Backoff  time.Duration `json:"backoff"`  // delay before the first retry, doubled each time; default 100ms
	MaxGap   int64         `json:"max_gap"`  // queued reads at most this far apart are coalesced; default 0 (touching or overlapping)
	MaxSpan  int64         `json:"max_span"` // coalesced requests stop growing at this size; default 8 MiB
	Header   http.Header   `json:"header"`   // added to every request (e.g. Authorization)

	// Validator pins the snapshot's identity (Reader.Validator of an earlier
	// open), for a second process that must read the very same file.
	Validator string `json:"validator"`
	// CacheDir keeps the ranges fetched on disk, per snapshot version
	// (URL and validator), so a second restore on this host reads them from
	// there: only the first 4 KiB, which carry the validator, come from the
	// server again. Default: $UFFDRESTORE_REMOTE_CACHE; "" and "off" mean
	// no cache. CacheMax bounds the directory (least recently used versions
	// go first; default $UFFDRESTORE_REMOTE_CACHE_MAX or 4 GiB).
	CacheDir string `json:"cache_dir"`
	CacheMax int64  `json:"cache_max"`
	// AllowNoValidator reads from a server that sends neither ETag nor
	// Last-Modified (a replaced file then goes unnoticed until a chunk's
	// checksum fails).
	AllowNoValidator bool `json:"allow_no_validator"`
}

func (o Options) withDefaults() Options {
	if o.Client == nil {
		o.Client = &http.Client{Transport: &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     90 * time.Second,
			ForceAttemptHTTP2:   true,
		}}
	}
	if o.Parallel <= 0 {
		o.Parallel = 8
	}
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	if o.Retries == 0 {
		o.Retries = 4
	} else if o.Retries < 0 {
		o.Retries = 0
	}
	if o.Backoff <= 0 {
		o.Backoff = 100 * time.Millisecond
	}
	if o.MaxSpan <= 0 {
		o.MaxSpan = 8 << 20
	}
	if o.CacheDir == "" {
		o.CacheDir = os.Getenv(CacheEnv)
	}
	if o.CacheDir == "off" {
		o.CacheDir = ""
	}
	if o.CacheMax <= 0 {
		if n, err := strconv.ParseInt(os.Getenv(CacheMaxEnv), 10, 64); err == nil && n > 0 {
			o.CacheMax = n
		} else {
			o.CacheMax = DefaultCacheMax
		}
	}
	return o
}

// Stats are a Reader's counters.
type Stats struct {
	Reads        int64 `json:"reads"`         // ReadAt calls
	Requests     int64 `json:"requests"`      // HTTP requests sent, retries included
	Retries      int64 `json:"retries"`       // requests that were retries
	Coalesced    int64 `json:"coalesced"`     // reads served by another read's request
	BytesFetched int64 `json:"bytes_fetched"` // response body bytes received
	HeadHits     int64 `json:"head_hits"`     // reads served from the first response's bytes
	CacheHits    int64 `json:"cache_hits"`    // reads served from the on-disk cache
	CacheBytes   int64 `json:"cache_bytes"`   // bytes read from the on-disk cache
	Size         int64 `json:"size"`          // the snapshot's size
}

// headWindow is what Open fetches first: the header and then some.
const headWindow = 4096

// Reader reads a remote snapshot. It is safe for concurrent use.
type Reader struct {
	url       string
	o         Options
	size      int64
	etag      string // strong ETag, or ""
	lastMod   string // Last-Modified, used when there is no strong ETag
	validator string
	head      []byte // bytes [0, len(head)) from the first response
	cache     *cache // nil without Options.CacheDir
	ownClient bool

	ctx    context.Context
	cancel context.CancelFunc

	closeOnce   sync.Once
	cacheMu     sync.RWMutex // Close vs cache use
	cacheClosed bool

	mu     sync.Mutex
	queue  []*pending
	active int

	reads, requests, retries, coalesced, fetched, headHits atomic.Int64
}

type pending struct {
	off  int64
	p    []byte
	done chan error
}

// Open opens the snapshot at rawURL: it sends the first ranged GET, which
// gives the size and the validator, and keeps the first bytes.
func Open(ctx context.Context, rawURL string, o Options) (*Reader, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("remote snapshot: %q is not an http:// or https:// URL", rawURL)
	}
	r := &Reader{url: rawURL, o: o.withDefaults(), size: -1, ownClient: o.Client == nil}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	buf := make([]byte, headWindow)
	n, err := r.fetch(ctx, buf, 0, true)
	if err != nil {
		r.cancel()
		return nil, err
	}
	r.head = buf[:n]
	if r.o.CacheDir != "" {
		if r.cache, err = openCache(r.o.CacheDir, r.o.CacheMax, rawURL, r.validator, r.size); err != nil {
			r.Close()
			return nil, err
		}
	}
	return r, nil
}

// Size returns the snapshot's size in bytes.
func (r *Reader) Size() int64 { return r.size }

// Parallel returns how many requests the reader runs at once
// (Options.Parallel, default 8).
func (r *Reader) Parallel() int { return r.o.Parallel }

// URL returns the URL the reader was opened with.
func (r *Reader) URL() string { return r.url }

// Validator returns the pinned identity of the snapshot: "etag:<ETag>" or
// "last-modified:<date>", then "/<size>".
func (r *Reader) Validator() string { return r.validator }

// Stats returns the reader's counters.
func (r *Reader) Stats() Stats {
	s := Stats{Reads: r.reads.Load(), Requests: r.requests.Load(), Retries: r.retries.Load(),
		Coalesced: r.coalesced.Load(), BytesFetched: r.fetched.Load(), HeadHits: r.headHits.Load(), Size: r.size}
	if c := r.cache; c != nil {
		c.mu.Lock()
		s.CacheHits, s.CacheBytes = c.hits, c.hitLen
		c.mu.Unlock()
	}
	return s
}

// Close cancels requests in flight and closes the reader's idle
// connections and cache files; later reads fail. It returns nil.
func (r *Reader) Close() error {
	r.closeOnce.Do(func() {
		r.cancel()
		if r.ownClient {
			r.o.Client.CloseIdleConnections()
		}
		if r.cache != nil {
			r.cacheMu.Lock()
			r.cache.close()
			r.cacheClosed = true
			r.cacheMu.Unlock()
		}
	})
	return nil
}

// ReadAt reads len(p) bytes at off. Reads past the end return io.EOF with
// the bytes before it.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	r.reads.Add(1)
	if off < 0 {
		return 0, fmt.Errorf("remote snapshot: negative offset %d", off)
	}
	if off >= r.size {
		return 0, io.EOF
	}
	want := p
	if int64(len(p)) > r.size-off {
		want = p[:r.size-off]
	}
	if len(want) == 0 {
		return 0, nil
	}
	if off+int64(len(want)) <= int64(len(r.head)) {
		r.headHits.Add(1)
		n := copy(want, r.head[off:])
		if n < len(p) {
			return n, io.EOF
		}
		return n, nil
	}
	if r.cacheGet(want, off) {
		if len(want) < len(p) {
			return len(want), io.EOF
		}
		return len(p), nil
	}
	pd := &pending{off: off, p: want, done: make(chan error, 1)}
	r.mu.Lock()
	r.queue = append(r.queue, pd)
	r.mu.Unlock()
	r.pump()
	if err := <-pd.done; err != nil {
		return 0, err
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

func (r *Reader) cacheGet(p []byte, off int64) bool {
	if r.cache == nil {
		return false
	}
	r.cacheMu.RLock()
	defer r.cacheMu.RUnlock()
	return !r.cacheClosed && r.cache.get(p, off)
}

func (r *Reader) cachePut(p []byte, off int64) {
	if r.cache == nil {
		return
	}
	r.cacheMu.RLock()
	defer r.cacheMu.RUnlock()
	if !r.cacheClosed {
		r.cache.put(p, off)
	}
}

// pump starts requests for queued reads while there are free slots. A
// request covers the lowest queued read and every queued read that starts
// within MaxGap of its end, up to MaxSpan bytes.
func (r *Reader) pump() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.active < r.o.Parallel && len(r.queue) > 0 {
		slices.SortFunc(r.queue, func(a, b *pending) int {
			switch {
			case a.off < b.off:
				return -1
			case a.off > b.off:
				return 1
			}
			return 0
		})
		start := r.queue[0].off
		end := start + int64(len(r.queue[0].p))
		k := 1
		for ; k < len(r.queue); k++ {
			q := r.queue[k]
			qend := q.off + int64(len(q.p))
			if q.off > end+r.o.MaxGap || max(end, qend)-start > r.o.MaxSpan {
				break
			}
			end = max(end, qend)
		}
		batch := slices.Clone(r.queue[:k])
		r.queue = slices.Delete(r.queue, 0, k)
		r.active++
		go r.serve(batch, start, end)
	}
}

func (r *Reader) serve(batch []*pending, start, end int64) {
	var err error
	if len(batch) == 1 {
		if _, err = r.fetch(r.ctx, batch[0].p, start, false); err == nil {
			r.cachePut(batch[0].p, start)
		}
	} else {
		r.coalesced.Add(int64(len(batch) - 1))
		buf := make([]byte, end-start)
		if _, err = r.fetch(r.ctx, buf, start, false); err == nil {
			r.cachePut(buf, start)
			for _, q := range batch {
				copy(q.p, buf[q.off-start:])
			}
		}
	}
	r.mu.Lock()
	r.active--
	r.mu.Unlock()
	for _, q := range batch {
		q.done <- err
	}
	r.pump()
}

// fetch reads [off, off+len(p)) into p with retries. On the first request
// (first=true) it learns the size and validator, and may read fewer bytes
// than len(p) when the file is shorter; it returns how many it read.
func (r *Reader) fetch(ctx context.Context, p []byte, off int64, first bool) (int, error) {
	rng := fmt.Sprintf("bytes=%d-%d", off, off+int64(len(p))-1)
	delay := r.o.Backoff
	var last error
	for attempt := 0; attempt <= r.o.Retries; attempt++ {
		if attempt > 0 {
			r.retries.Add(1)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return 0, fmt.Errorf("remote snapshot: GET %s (%s): %w", r.url, rng, ctx.Err())
			}
			delay *= 2
		}
		n, err, retry := r.attempt(ctx, p, off, rng, first)
		if err == nil {
			return n, nil
		}
		if !retry || ctx.Err() != nil {
			return 0, err
		}
		last = err
	}
	if errors.Is(last, ErrTimeout) {
		return 0, fmt.Errorf("%w (%d attempts, %s each): %w", ErrUnavailable, r.o.Retries+1, r.o.Timeout, last)
	}
	return 0, fmt.Errorf("%w (%d attempts): %w", ErrUnavailable, r.o.Retries+1, last)
}

// attempt sends one ranged GET. retry says whether the failure is worth
// another attempt.
func (r *Reader) attempt(ctx context.Context, p []byte, off int64, rng string, first bool) (n int, err error, retry bool) {
	r.requests.Add(1)
	actx, cancel := context.WithTimeout(ctx, r.o.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(actx, http.MethodGet, r.url, nil)
	if err != nil {
		return 0, fmt.Errorf("remote snapshot: %w", err), false
	}
	for k, vs := range r.o.Header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	req.Header.Set("Range", rng)
	// Ranges of a compressed file would be ranges of the compressed bytes.
	req.Header.Set("Accept-Encoding", "identity")
	if !first {
		if r.etag != "" {
			req.Header.Set("If-Match", r.etag)
		} else if r.lastMod != "" {
			req.Header.Set("If-Unmodified-Since", r.lastMod)
		}
	}
	where := fmt.Sprintf("GET %s (%s)", r.url, rng)
	timedOut := func(err error) error {
		if errors.Is(actx.Err(), context.DeadlineExceeded) && ctx.Err() == nil {
			return fmt.Errorf("%w: %s: no complete answer within %s: %v", ErrTimeout, where, r.o.Timeout, err)
		}
		return nil
	}
	resp, err := r.o.Client.Do(req)
	if err != nil {
		if te := timedOut(err); te != nil {
			return 0, te, true
		}
		return 0, fmt.Errorf("remote snapshot: %s: %w", where, err), retryable(err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		return 0, fmt.Errorf("%w: %s: %s", ErrNotFound, where, resp.Status), false
	case resp.StatusCode == http.StatusPreconditionFailed:
		return 0, fmt.Errorf("%w: %s: the server no longer has the version pinned at open (%s): %s", ErrChanged, where, r.validator, resp.Status), false
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && first:
		// An empty file: nothing to read, the size is in Content-Range.
		if err := r.pin(resp, 0); err != nil {
			return 0, err, false
		}
		return 0, nil, false
	case resp.StatusCode == http.StatusOK:
		return 0, fmt.Errorf("%w: %s: answered %s with the whole file instead of %s; serve it from a server that honours Range (nginx, an object store) or download it first",
			ErrNoRange, where, resp.Status, rng), false
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusRequestTimeout:
		return 0, fmt.Errorf("remote snapshot: %s: %s", where, resp.Status), true
	case resp.StatusCode != http.StatusPartialContent:
		return 0, fmt.Errorf("%w: %s: %s", ErrHTTP, where, resp.Status), false
	}
	if ce := resp.Header.Get("Content-Encoding"); ce != "" && ce != "identity" {
		return 0, fmt.Errorf("%w: %s: the body is %s-encoded; ranges of an encoded body are not the file's bytes", ErrNoRange, where, ce), false
	}
	a, b, total, err := contentRange(resp.Header.Get("Content-Range"))
	if err != nil {
		return 0, fmt.Errorf("%w: %s: %v", ErrNoRange, where, err), false
	}
	if first {
		if err := r.pin(resp, total); err != nil {
			return 0, err, false
		}
	} else if err := r.check(resp, total); err != nil {
		return 0, fmt.Errorf("%w: %s: %v", ErrChanged, where, err), false
	}
	want := min(int64(len(p)), total-off)
	if a != off || b-a+1 != want {
		return 0, fmt.Errorf("%w: %s: the server sent bytes %d-%d instead", ErrNoRange, where, a, b), false
	}
	n, err = io.ReadFull(resp.Body, p[:want])
	r.fetched.Add(int64(n))
	if err != nil {
		if te := timedOut(err); te != nil {
			return 0, te, true
		}
		// A connection cut mid-body: try again.
		return 0, fmt.Errorf("remote snapshot: %s: body cut short after %d of %d bytes: %w", where, n, want, err), true
	}
	return n, nil, false
}

// pin records the size and validator of the first response (or checks them
// against Options.Validator).
func (r *Reader) pin(resp *http.Response, total int64) error {
	r.size = total
	if et := resp.Header.Get("ETag"); et != "" && !strings.HasPrefix(et, "W/") {
		r.etag = et
		r.validator = "etag:" + et
	} else if lm := resp.Header.Get("Last-Modified"); lm != "" {
		r.lastMod = lm
		r.validator = "last-modified:" + lm
	} else if !r.o.AllowNoValidator {
		return fmt.Errorf("%w: GET %s", ErrNoValidator, r.url)
	}
	r.validator += "/" + strconv.FormatInt(total, 10)
	if r.o.Validator != "" && r.o.Validator != r.validator {
		return fmt.Errorf("%w: GET %s: it is %s now, %s when first opened", ErrChanged, r.url, r.validator, r.o.Validator)
	}
	return nil
}

// check compares a later response with the pinned validator and size.
func (r *Reader) check(resp *http.Response, total int64) error {
	if total != r.size {
		return fmt.Errorf("its size is %d now, %d when opened", total, r.size)
	}
	if r.etag != "" {
		if et := resp.Header.Get("ETag"); et != r.etag {
			return fmt.Errorf("its ETag is %q now, %q when opened", et, r.etag)
		}
	} else if r.lastMod != "" {
		if lm := resp.Header.Get("Last-Modified"); lm != r.lastMod {
			return fmt.Errorf("its Last-Modified is %q now, %q when opened", lm, r.lastMod)
		}
	}
	return nil
}

// contentRange parses "bytes a-b/total" (or "bytes */total").
func contentRange(s string) (a, b, total int64, err error) {
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return 0, 0, 0, fmt.Errorf("206 without a byte Content-Range (%q)", s)
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, fmt.Errorf("bad Content-Range %q", s)
	}
	total, err = strconv.ParseInt(tot, 10, 64)
	if err != nil || total < 0 {
		return 0, 0, 0, fmt.Errorf("Content-Range %q does not give the file's size", s)
	}
	if rng == "*" {
		return 0, -1, total, nil
	}
	as, bs, ok := strings.Cut(rng, "-")
	a, err1 := strconv.ParseInt(as, 10, 64)
	b, err2 := strconv.ParseInt(bs, 10, 64)
	if !ok || err1 != nil || err2 != nil || a < 0 || b < a || b >= total {
		return 0, 0, 0, fmt.Errorf("bad Content-Range %q", s)
	}
	return a, b, total, nil
}

// retryable reports whether a transport error may go away on another try.
func retryable(err error) bool {
	if errors.Is(err, context.Canceled) {
		return false
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.As(err, new(*net.OpError))
}
