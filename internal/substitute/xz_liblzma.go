//go:build cgo && linux

package substitute

// An xz decoder running liblzma in this process, loaded at run time with
// dlopen so that building nixyard needs neither liblzma's headers nor its
// development library. Decoding in process saves, per NAR, the start of
// an xz process and two pipe copies: on a closure of 400 NARs that was a
// quarter of the CPU that xz decompression cost (14.2 s of CPU for 400
// `xz -d` processes against 10.7 s for one process decoding the same
// streams).

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
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

static nx_decoder_fn nx_decoder;
static nx_code_fn nx_code_p;
static nx_end_fn nx_end_p;

// nx_load loads liblzma.so.5; it returns 0 on success.
static int nx_load(void) {
	void *h = dlopen("liblzma.so.5", RTLD_NOW | RTLD_LOCAL);
	if (h == NULL) {
		return -1;
	}
	nx_decoder = (nx_decoder_fn)dlsym(h, "lzma_stream_decoder");
	nx_code_p = (nx_code_fn)dlsym(h, "lzma_code");
	nx_end_p = (nx_end_fn)dlsym(h, "lzma_end");
	if (nx_decoder == NULL || nx_code_p == NULL || nx_end_p == NULL) {
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
	"sync"
	"unsafe"
)

// xzMemLimit bounds liblzma's memory per decoder. xz -9 needs 65 MiB to
// decode; Nix compresses with at most that.
const xzMemLimit = 256 << 20

var (
	liblzmaOnce sync.Once
	liblzmaOK   bool
)

// newLiblzmaReader returns a decoder of r through liblzma, or ok false if
// liblzma.so.5 cannot be loaded. release frees the decoder; the reader
// must not be used after it.
func newLiblzmaReader(r io.Reader) (_ io.Reader, release func(), ok bool, err error) {
	liblzmaOnce.Do(func() { liblzmaOK = C.nx_load() == 0 })
	if !liblzmaOK {
		return nil, nil, false, nil
	}
	var ret C.int
	s := C.nx_new(C.uint64_t(xzMemLimit), &ret)
	if s == nil {
		return nil, nil, true, fmt.Errorf("liblzma: creating a decoder: %w", lzmaError(ret))
	}
	lr := &liblzmaReader{r: r, s: s, in: make([]byte, 64<<10)}
	return lr, lr.free, true, nil
}

// liblzmaReader is an io.Reader of the data decoded from r.
type liblzmaReader struct {
	r      io.Reader
	s      *C.nx_lzma_stream
	in     []byte
	lo, hi int   // undecoded input in[lo:hi]
	rerr   error // r's error (io.EOF at its end)
	err    error // the reader's sticky error, io.EOF at the end of the data
}

func (z *liblzmaReader) Read(p []byte) (int, error) {
	if z.err != nil {
		return 0, z.err
	}
	if z.s == nil {
		return 0, errors.New("liblzma: read after release")
	}
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if z.lo == z.hi && z.rerr == nil {
			z.lo = 0
			z.hi, z.rerr = z.r.Read(z.in)
			if z.rerr != nil && z.rerr != io.EOF {
				z.err = z.rerr
				return 0, z.err
			}
		}
		var in *C.uint8_t
		if z.lo < z.hi {
			in = (*C.uint8_t)(unsafe.Pointer(&z.in[z.lo]))
		}
		finish := C.int(0)
		if z.rerr == io.EOF {
			finish = 1
		}
		res := C.nx_code(z.s, in, C.size_t(z.hi-z.lo), (*C.uint8_t)(unsafe.Pointer(&p[0])), C.size_t(len(p)), finish)
		z.lo += int(res.in_used)
		n := int(res.out_used)
		switch res.ret {
		case 0: // LZMA_OK
		case 1: // LZMA_STREAM_END
			z.err = io.EOF
			return n, nil
		case 10: // LZMA_BUF_ERROR: no progress possible
			if z.rerr == io.EOF {
				z.err = fmt.Errorf("xz: %w", io.ErrUnexpectedEOF)
			} else {
				z.err = fmt.Errorf("xz: %w", lzmaError(res.ret))
			}
			return n, z.err
		default:
			z.err = fmt.Errorf("xz: %w", lzmaError(res.ret))
			return n, z.err
		}
		if n > 0 {
			return n, nil
		}
	}
}

func (z *liblzmaReader) free() {
	if z.s != nil {
		C.nx_free(z.s)
		z.s = nil
	}
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
