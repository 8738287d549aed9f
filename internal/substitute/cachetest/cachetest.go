// Package cachetest serves a directory (a binary cache written by
// `nix copy --to file://…`) over HTTP on 127.0.0.1 for tests, counting
// requests and injecting faults: error statuses with Retry-After, a delay
// before the first byte, a connection reset, a silent truncation or a
// stall after some body bytes, a slow body, and corrupted bodies.
package cachetest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Fault is one injected misbehaviour, used for one request.
type Fault struct {
	Status     int           // if non-zero, answer with this status and no body
	RetryAfter string        // Retry-After header sent with Status
	Delay      time.Duration // wait before the headers (ends early if the client goes away)
	// Held, if set, is called when the request comes, and the answer
	// waits (before its headers) until Release is closed or the client
	// goes away.
	Held       func()
	Release    <-chan struct{}
	ResetAfter int64 // if > 0, send the full Content-Length but reset the connection (RST) after this many body bytes
	CutAfter   int64 // if > 0, send the full Content-Length but close cleanly (FIN) after this many body bytes
	// Unmeasured sends the body without a Content-Length (chunked); with
	// CutAfter, the body then ends cleanly after that many bytes, as one
	// whose connection a proxy cut would, with nothing to tell it short.
	Unmeasured bool
	FlipByte   int64 // if > 0, flip the bits of the body byte at offset FlipByte-1
	// StallAfter, if > 0, sends the full Content-Length and this many body
	// bytes, then sends nothing more until the client goes away; OnStall
	// (if set) is called each time a request stalls, once those bytes are
	// flushed.
	StallAfter int64
	OnStall    func()
	// Trickle, if > 0, sends the body 64 KiB at a time with this pause
	// before each piece after the first (a slow cache), until the client
	// goes away.
	Trickle time.Duration
}

type rule struct {
	pattern string
	faults  []Fault // consumed in order; the last is kept if sticky
	sticky  bool
}

// Server is a fault-injecting binary cache server. Its methods are safe
// for concurrent use.
type Server struct {
	// URL is the base URL, e.g. "http://127.0.0.1:41234".
	URL string
	// Dir is the directory served.
	Dir string

	ts *httptest.Server

	mu     sync.Mutex
	rules  []*rule
	counts map[string]int
	// NAR requests (under nar/) being served now, and the most at once.
	narsNow, narsMax int

	caPEM []byte // NewTLS's certificate authority
}

// New serves dir over http until Close.
func New(dir string) *Server {
	s := &Server{Dir: dir, counts: map[string]int{}}
	s.ts = httptest.NewServer(http.HandlerFunc(s.serve))
	s.URL = s.ts.URL
	return s
}

// NewTLS serves dir over https until Close, with a certificate for
// 127.0.0.1 issued by a certificate authority made for this server alone;
// CAPEM returns that authority's certificate.
func NewTLS(dir string) (*Server, error) {
	caPEM, leaf, err := newCertificates()
	if err != nil {
		return nil, fmt.Errorf("cachetest: %w", err)
	}
	s := &Server{Dir: dir, counts: map[string]int{}, caPEM: caPEM}
	s.ts = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.ts.TLS = &tls.Config{Certificates: []tls.Certificate{leaf}}
	s.ts.StartTLS()
	s.URL = s.ts.URL
	return s, nil
}

// CAPEM is the PEM certificate of the authority that issued a NewTLS
// server's certificate (nil for New's).
func (s *Server) CAPEM() []byte { return s.caPEM }

// newCertificates makes a certificate authority (ECDSA P-256) and a
// server certificate for 127.0.0.1 it issues, valid for a day.
func newCertificates() (caPEM []byte, leaf tls.Certificate, err error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, leaf, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cachetest CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, leaf, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, leaf, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, leaf, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, leaf, err
	}
	leaf = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), leaf, nil
}

// Close stops the server and closes its connections.
func (s *Server) Close() { s.ts.Close() }

// Inject queues faults for the next requests whose path (without the
// leading slash) matches the path.Match pattern, one fault per request.
func (s *Server) Inject(pattern string, faults ...Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rules = append(s.rules, &rule{pattern: pattern, faults: faults})
}

// Always applies f to every request matching pattern from now on.
func (s *Server) Always(pattern string, f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rules = append(s.rules, &rule{pattern: pattern, faults: []Fault{f}, sticky: true})
}

// Count returns how many GET requests for p (without leading slash) arrived.
func (s *Server) Count(p string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[p]
}

// Counts returns a copy of the per-path GET counts.
func (s *Server) Counts() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[string]int, len(s.counts))
	for k, v := range s.counts {
		m[k] = v
	}
	return m
}

// MaxConcurrentNARs returns the most NAR requests (paths under nar/)
// served at once so far.
func (s *Server) MaxConcurrentNARs() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.narsMax
}

func (s *Server) fault(p string) (Fault, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.counts[p]++
	for _, r := range s.rules {
		if ok, _ := path.Match(r.pattern, p); !ok || len(r.faults) == 0 {
			continue
		}
		f := r.faults[0]
		if !r.sticky {
			r.faults = r.faults[1:]
		}
		return f, true
	}
	return Fault{}, false
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		http.Error(w, "read-only", http.StatusMethodNotAllowed)
		return
	}
	p := r.URL.Path
	if len(p) > 0 && p[0] == '/' {
		p = p[1:]
	}
	if strings.HasPrefix(p, "nar/") {
		s.mu.Lock()
		s.narsNow++
		s.narsMax = max(s.narsMax, s.narsNow)
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			s.narsNow--
			s.mu.Unlock()
		}()
	}
	f, _ := s.fault(p)
	if f.Held != nil {
		f.Held()
	}
	if f.Release != nil {
		select {
		case <-f.Release:
		case <-r.Context().Done():
			return
		}
	}
	if f.Delay > 0 {
		t := time.NewTimer(f.Delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	if f.Status != 0 {
		if f.RetryAfter != "" {
			w.Header().Set("Retry-After", f.RetryAfter)
		}
		w.WriteHeader(f.Status)
		return
	}
	if !filepath.IsLocal(p) {
		http.NotFound(w, r)
		return
	}
	data, err := os.ReadFile(filepath.Join(s.Dir, p))
	if errors.Is(err, os.ErrNotExist) {
		http.NotFound(w, r)
		return
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	if f.FlipByte > 0 && f.FlipByte <= int64(len(data)) {
		data = append([]byte(nil), data...)
		data[f.FlipByte-1] ^= 0xff
	}
	if f.StallAfter > 0 && f.StallAfter < int64(len(data)) {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.Write(data[:f.StallAfter])
		http.NewResponseController(w).Flush()
		if f.OnStall != nil {
			f.OnStall()
		}
		<-r.Context().Done()
		return
	}
	if f.Trickle > 0 {
		trickle(w, r, data, f.Trickle)
		return
	}
	cut := f.ResetAfter
	if f.CutAfter > 0 {
		cut = f.CutAfter
	}
	if f.Unmeasured {
		http.NewResponseController(w).Flush() // the headers, without a length: chunked
		if cut > 0 && cut < int64(len(data)) {
			data = data[:cut]
		}
		w.Write(data)
		return
	}
	if cut <= 0 || cut >= int64(len(data)) {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.Write(data)
		return
	}
	// Send headers and part of the body by hand, then break the connection.
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(fmt.Sprintf("cachetest: hijack: %v", err))
	}
	defer conn.Close()
	fmt.Fprintf(buf, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n", len(data))
	buf.Write(data[:cut])
	buf.Flush()
	if f.ResetAfter > 0 {
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetLinger(0) // close with RST
		}
	}
}

// trickle sends data 64 KiB at a time, pausing between pieces.
func trickle(w http.ResponseWriter, r *http.Request, data []byte, pause time.Duration) {
	w.Header().Set("Content-Length", strconv.Itoa(len(data)))
	rc := http.NewResponseController(w)
	for len(data) > 0 {
		n := min(len(data), 64<<10)
		if _, err := w.Write(data[:n]); err != nil {
			return
		}
		rc.Flush()
		data = data[n:]
		if len(data) == 0 {
			return
		}
		t := time.NewTimer(pause)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
}
