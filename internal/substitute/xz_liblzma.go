//go:build cgo && linux

package substitute

// An xz decoder running liblzma in this process, loaded at run time with
// dlopen so that building nixyard needs neither liblzma's headers nor its
// development library. Decoding in process saves, per NAR, the start of
// an xz process and two pipe copies: on a closure of 400 NARs that was a
// quarter of the CPU that xz decompression cost (14.2 s of CPU for 400
// `xz -d` processes against 10.7 s for one process decoding the same
// streams).
//
// Each decoder runs liblzma on a C thread of its own (nx_worker) rather
// than in cgo calls: 48 streams of 8 MiB decoded 16 at a time, each hashed
// as it is read, took 12.4–15.1 s of CPU that way against 16.0–16.4 s
// with the same decoding in cgo calls from the reading goroutines.
//
// A released decoder is kept for the next NAR (xzPool) rather than freed:
// a closure is hundreds of NARs, and each new decoder would start a thread
// and allocate, then fault in, liblzma's dictionary and its buffers again.

/*
#cgo LDFLAGS: -ldl -lpthread
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <unistd.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// lzma_stream as liblzma.so.5 lays it out (lzma/base.h); the soname
// promises this ABI.
typedef struct {
	const uint8_t *next_in;
	size_t avail_in;
	uint64_t total_in;
	uint8_t *next_out;
	size_t avail_out;
	uint64_t total_out;
	const void *allocator;
	void *internal;
	void *reserved_ptr1, *reserved_ptr2, *reserved_ptr3, *reserved_ptr4;
	uint64_t reserved_int1, reserved_int2;
	size_t reserved_int3, reserved_int4;
	int reserved_enum1, reserved_enum2;
} nx_lzma_stream;

typedef int (*nx_decoder_fn)(nx_lzma_stream *, uint64_t, uint32_t);
typedef int (*nx_code_fn)(nx_lzma_stream *, int);
typedef void (*nx_end_fn)(nx_lzma_stream *);
typedef uint64_t (*nx_memusage_fn)(const nx_lzma_stream *);

static nx_decoder_fn nx_decoder;
static nx_code_fn nx_code_p;
static nx_end_fn nx_end_p;
static nx_memusage_fn nx_memusage_p;

// nx_load loads liblzma.so.5; it returns 0 on success.
static int nx_load(void) {
	void *h = dlopen("liblzma.so.5", RTLD_NOW | RTLD_LOCAL);
	if (h == NULL) {
		return -1;
	}
	nx_decoder = (nx_decoder_fn)dlsym(h, "lzma_stream_decoder");
	nx_code_p = (nx_code_fn)dlsym(h, "lzma_code");
	nx_end_p = (nx_end_fn)dlsym(h, "lzma_end");
	nx_memusage_p = (nx_memusage_fn)dlsym(h, "lzma_memusage");
	if (nx_decoder == NULL || nx_code_p == NULL || nx_end_p == NULL || nx_memusage_p == NULL) {
		dlclose(h);
		return -1;
	}
	return 0;
}

// nx_new returns a stream decoder of concatenated .xz streams (as xz -d
// decodes them), or NULL with *ret set.
static nx_lzma_stream *nx_new(uint64_t memlimit, int *ret) {
	nx_lzma_stream *s = calloc(1, sizeof *s);
	if (s == NULL) {
		*ret = 5; // LZMA_MEM_ERROR
		return NULL;
	}
	*ret = nx_decoder(s, memlimit, 0x08); // LZMA_CONCATENATED
	if (*ret != 0) {
		nx_end_p(s);
		free(s);
		return NULL;
	}
	return s;
}

// nx_reset makes s, a decoder used before, decode a new stream; liblzma
// keeps the memory it has where it can.
static int nx_reset(nx_lzma_stream *s, uint64_t memlimit) {
	return nx_decoder(s, memlimit, 0x08); // LZMA_CONCATENATED
}

static uint64_t nx_memusage(nx_lzma_stream *s) {
	return nx_memusage_p(s);
}

typedef struct {
	int ret;
	size_t in_used, out_used;
} nx_result;

// nx_code runs lzma_code on the caller's buffers, which the stream does
// not keep past the call.
static nx_result nx_code(nx_lzma_stream *s, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len, int finish) {
	s->next_in = in;
	s->avail_in = in_len;
	s->next_out = out;
	s->avail_out = out_len;
	nx_result r;
	r.ret = nx_code_p(s, finish ? 3 : 0); // LZMA_FINISH : LZMA_RUN
	r.in_used = in_len - s->avail_in;
	r.out_used = out_len - s->avail_out;
	s->next_in = NULL;
	s->avail_in = 0;
	s->next_out = NULL;
	s->avail_out = 0;
	return r;
}

// nx_worker decodes one stream on a thread of its own. A cgo call that
// runs for milliseconds counts as a system call to the Go scheduler, which
// then hands the caller's P to another thread and keeps its monitor waking
// every 20 µs; decoding on a C thread, with the Go side waiting on an
// eventfd in the network poller, costs neither.
typedef struct {
	nx_lzma_stream *s;
	pthread_t th;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int efd;  // eventfd: written once per finished job
	int job;  // a job is waiting for the worker
	int quit; // the worker is to exit
	const uint8_t *in;
	size_t in_len;
	uint8_t *out;
	size_t out_len;
	int finish;
	nx_result res;
} nx_worker;

static void *nx_worker_main(void *arg) {
	nx_worker *w = arg;
	pthread_mutex_lock(&w->mu);
	for (;;) {
		while (!w->job && !w->quit) {
			pthread_cond_wait(&w->cv, &w->mu);
		}
		if (w->quit) {
			break;
		}
		pthread_mutex_unlock(&w->mu);
		nx_result r = nx_code(w->s, w->in, w->in_len, w->out, w->out_len, w->finish);
		pthread_mutex_lock(&w->mu);
		w->res = r;
		w->job = 0;
		uint64_t one = 1;
		while (write(w->efd, &one, sizeof one) < 0 && errno == EINTR) {
		}
	}
	pthread_mutex_unlock(&w->mu);
	return NULL;
}

// nx_worker_new starts a worker for s that signals efd; NULL on failure.
static nx_worker *nx_worker_new(nx_lzma_stream *s, int efd) {
	nx_worker *w = calloc(1, sizeof *w);
	if (w == NULL) {
		return NULL;
	}
	w->s = s;
	w->efd = efd;
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cv, NULL);
	if (pthread_create(&w->th, NULL, nx_worker_main, w) != 0) {
		pthread_cond_destroy(&w->cv);
		pthread_mutex_destroy(&w->mu);
		free(w);
		return NULL;
	}
	return w;
}

// nx_worker_submit hands the worker a job on buffers that stay valid (C
// memory) until its result is taken.
static void nx_worker_submit(nx_worker *w, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len, int finish) {
	pthread_mutex_lock(&w->mu);
	w->in = in;
	w->in_len = in_len;
	w->out = out;
	w->out_len = out_len;
	w->finish = finish;
	w->job = 1;
	pthread_cond_signal(&w->cv);
	pthread_mutex_unlock(&w->mu);
}

// nx_worker_result returns the finished job's result.
static nx_result nx_worker_result(nx_worker *w) {
	pthread_mutex_lock(&w->mu);
	nx_result r = w->res;
	pthread_mutex_unlock(&w->mu);
	return r;
}

// nx_worker_free stops the worker, after the job it is running if any,
// and frees it.
static void nx_worker_free(nx_worker *w) {
	pthread_mutex_lock(&w->mu);
	w->quit = 1;
	pthread_cond_signal(&w->cv);
	pthread_mutex_unlock(&w->mu);
	pthread_join(w->th, NULL);
	pthread_cond_destroy(&w->cv);
	pthread_mutex_destroy(&w->mu);
	free(w);
}

static void nx_free(nx_lzma_stream *s) {
	nx_end_p(s);
	free(s);
}
*/
import "C"

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// xzMemLimit bounds liblzma's memory per decoder. xz -9 needs 65 MiB to
// decode; Nix compresses with at most that.
const xzMemLimit = 256 << 20

var (
	liblzmaOnce sync.Once
	liblzmaOK   bool
)

// Buffer sizes of a decoder: compressed input, decoded output. Both are C
// memory, which the decoder thread may use between cgo calls.
const (
	xzInSize  = 64 << 10
	xzOutSize = 256 << 10
)

// newLiblzmaReader returns a decoder of r through liblzma, or ok false if
// liblzma.so.5 cannot be loaded. release hands the decoder back (to
// xzPool, or frees it); the reader must not be used after it, nor be
// reading when it is called.
func newLiblzmaReader(r io.Reader) (_ io.Reader, release func(), ok bool, err error) {
	liblzmaOnce.Do(func() { liblzmaOK = C.nx_load() == 0 })
	if !liblzmaOK {
		return nil, nil, false, nil
	}
	d, err := xzPool.get()
	if err != nil {
		return nil, nil, true, fmt.Errorf("liblzma: %w", err)
	}
	z := &liblzmaReader{r: r, d: d}
	return z, z.release, true, nil
}

// lzmaDecoder is liblzma's state for one stream at a time, the thread
// that runs it (nx_worker) and its buffers.
type lzmaDecoder struct {
	s         *C.nx_lzma_stream
	w         *C.nx_worker
	done      *os.File       // the worker's eventfd, read through the poller
	cin, cout unsafe.Pointer // C buffers of xzInSize and xzOutSize bytes
	in, out   []byte         // the same, as slices
	busy      bool           // a job may still be running: free, never reuse
	idleSince time.Time      // while in xzPool
}

func newLZMADecoder() (*lzmaDecoder, error) {
	d := &lzmaDecoder{}
	if err := d.init(); err != nil {
		d.free()
		return nil, err
	}
	return d, nil
}

func (d *lzmaDecoder) init() error {
	var ret C.int
	if d.s = C.nx_new(C.uint64_t(xzMemLimit), &ret); d.s == nil {
		return fmt.Errorf("creating a decoder: %w", lzmaError(ret))
	}
	if d.cin, d.cout = C.malloc(xzInSize), C.malloc(xzOutSize); d.cin == nil || d.cout == nil {
		return errors.New("creating a decoder: out of memory")
	}
	d.in, d.out = unsafe.Slice((*byte)(d.cin), xzInSize), unsafe.Slice((*byte)(d.cout), xzOutSize)
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	d.done = os.NewFile(uintptr(fd), "xz decoder eventfd")
	if d.w = C.nx_worker_new(d.s, C.int(fd)); d.w == nil {
		return errors.New("starting a decoder thread failed")
	}
	return nil
}

// free stops the decoder thread (after its job, if one is running) and
// frees everything.
func (d *lzmaDecoder) free() {
	if d.w != nil {
		C.nx_worker_free(d.w)
		d.w = nil
	}
	if d.done != nil {
		d.done.Close()
		d.done = nil
	}
	if d.s != nil {
		C.nx_free(d.s)
		d.s = nil
	}
	C.free(d.cin)
	C.free(d.cout)
	d.cin, d.cout, d.in, d.out = nil, nil, nil, nil
}

// Idle decoders kept for reuse. Decoders whose liblzma state is larger
// than xzPoolMaxMem (the dictionary of an xz -7 stream or more) are freed
// instead, and a kept decoder unused for xzPoolIdle is freed too, so idle
// decoders hold at most xzPoolMax × (xzPoolMaxMem + the buffers), for a
// little while after substituting.
const (
	xzPoolMax    = 16
	xzPoolMaxMem = 16 << 20
	xzPoolIdle   = 30 * time.Second
)

var xzPool lzmaPool

type lzmaPool struct {
	mu    sync.Mutex
	idle  []*lzmaDecoder // most recently used last
	sweep *time.Timer    // frees decoders idle for xzPoolIdle; nil when idle is empty
}

// get returns an idle decoder, reset for a new stream, or a new one.
func (p *lzmaPool) get() (*lzmaDecoder, error) {
	p.mu.Lock()
	var d *lzmaDecoder
	if n := len(p.idle); n > 0 {
		d = p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
	}
	p.mu.Unlock()
	if d == nil {
		return newLZMADecoder()
	}
	if ret := C.nx_reset(d.s, C.uint64_t(xzMemLimit)); ret != 0 {
		d.free()
		return nil, fmt.Errorf("resetting a decoder: %w", lzmaError(ret))
	}
	return d, nil
}

// put keeps d for reuse, or frees it.
func (p *lzmaPool) put(d *lzmaDecoder) {
	if d.busy || uint64(C.nx_memusage(d.s)) > xzPoolMaxMem {
		d.free()
		return
	}
	p.mu.Lock()
	d.idleSince = time.Now() // under mu: idle stays in idleSince order
	if len(p.idle) >= xzPoolMax {
		p.mu.Unlock()
		d.free()
		return
	}
	p.idle = append(p.idle, d)
	if p.sweep == nil {
		p.sweep = time.AfterFunc(xzPoolIdle, p.freeIdle)
	}
	p.mu.Unlock()
}

// freeIdle frees the decoders idle for xzPoolIdle and comes back for the
// others.
func (p *lzmaPool) freeIdle() {
	p.mu.Lock()
	cutoff := time.Now().Add(-xzPoolIdle)
	var old []*lzmaDecoder
	keep := p.idle[:0]
	for _, d := range p.idle {
		if d.idleSince.Before(cutoff) {
			old = append(old, d)
		} else {
			keep = append(keep, d)
		}
	}
	clear(p.idle[len(keep):])
	p.idle = keep
	if p.sweep != nil {
		p.sweep.Stop() // a no-op when the sweep is this call
		p.sweep = nil
	}
	if len(keep) > 0 {
		p.sweep = time.AfterFunc(time.Until(keep[0].idleSince.Add(xzPoolIdle)), p.freeIdle)
	}
	p.mu.Unlock()
	for _, d := range old {
		d.free()
	}
}

// drain frees every idle decoder (tests count threads after it).
func (p *lzmaPool) drain() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	if p.sweep != nil {
		p.sweep.Stop()
		p.sweep = nil
	}
	p.mu.Unlock()
	for _, d := range idle {
		d.free()
	}
}

// liblzmaReader is an io.Reader of the data decoded from r. The decoding
// runs on the decoder's thread, one job at a time: Read hands it the
// undecoded input and an output buffer and waits on its eventfd.
type liblzmaReader struct {
	r        io.Reader
	d        *lzmaDecoder // nil after release
	lo, hi   int          // undecoded input d.in[lo:hi]
	olo, ohi int          // decoded output not yet read, d.out[olo:ohi]
	rerr     error        // r's error (io.EOF at its end)
	err      error        // the reader's sticky error, io.EOF at the end of the data
}

// release hands the decoder back; see newLiblzmaReader.
func (z *liblzmaReader) release() {
	if z.d != nil {
		xzPool.put(z.d)
		z.d = nil
	}
	z.olo, z.ohi = 0, 0
}

func (z *liblzmaReader) Read(p []byte) (int, error) {
	d := z.d
	if d == nil {
		return 0, errors.New("liblzma: read after release")
	}
	if z.olo < z.ohi {
		n := copy(p, d.out[z.olo:z.ohi])
		z.olo += n
		return n, nil
	}
	if z.err != nil {
		return 0, z.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if z.lo == z.hi && z.rerr == nil {
			z.lo = 0
			z.hi, z.rerr = z.r.Read(d.in)
			if z.rerr != nil && z.rerr != io.EOF {
				z.err = z.rerr
				return 0, z.err
			}
		}
		res, err := z.code(z.rerr == io.EOF)
		if err != nil {
			z.err = err
			return 0, err
		}
		z.lo += int(res.in_used)
		z.olo, z.ohi = 0, int(res.out_used)
		switch res.ret {
		case 0: // LZMA_OK
		case 1: // LZMA_STREAM_END
			z.err = io.EOF
		case 10: // LZMA_BUF_ERROR: no progress possible
			if z.rerr == io.EOF {
				z.err = fmt.Errorf("xz: %w", io.ErrUnexpectedEOF)
			} else {
				z.err = fmt.Errorf("xz: %w", lzmaError(res.ret))
			}
		default:
			z.err = fmt.Errorf("xz: %w", lzmaError(res.ret))
		}
		if z.ohi > 0 {
			z.olo = copy(p, d.out[:z.ohi])
			return z.olo, nil
		}
		if z.err != nil {
			return 0, z.err
		}
	}
}

// code has the decoder thread decode d.in[lo:hi] into d.out and waits for
// it.
func (z *liblzmaReader) code(finish bool) (C.nx_result, error) {
	d := z.d
	var in *C.uint8_t
	if z.lo < z.hi {
		in = (*C.uint8_t)(unsafe.Add(d.cin, z.lo))
	}
	fin := C.int(0)
	if finish {
		fin = 1
	}
	C.nx_worker_submit(d.w, in, C.size_t(z.hi-z.lo), (*C.uint8_t)(d.cout), xzOutSize, fin)
	var b [8]byte
	if _, err := io.ReadFull(d.done, b[:]); err != nil {
		d.busy = true
		return C.nx_result{}, fmt.Errorf("liblzma: waiting for the decoder thread: %w", err)
	}
	return C.nx_worker_result(d.w), nil
}

// lzmaError describes a liblzma lzma_ret.
func lzmaError(ret C.int) error {
	switch ret {
	case 5:
		return errors.New("out of memory")
	case 6:
		return fmt.Errorf("needs more than the %d MiB memory limit", xzMemLimit>>20)
	case 7:
		return errors.New("not in the .xz format")
	case 8:
		return errors.New("unsupported options")
	case 9:
		return errors.New("compressed data is corrupt")
	case 10:
		return errors.New("no progress possible")
	}
	return fmt.Errorf("liblzma error %d", int(ret))
}
