// Package cache connects the store to binary caches: Server serves it as
// one, and Pusher (push.go) pushes built paths to one, a Target
// (target.go): a directory, an HTTP cache taking PUT or S3-compatible
// object storage (s3.go).
//
// The Server serves the store as nix-serve does, so that other hosts (or
// containers without the host's socket) can substitute from it with
// substituters = http://HOST:PORT:
//
//	GET /nix-cache-info           StoreDir, WantMassQuery, Priority
//	GET /HASH.narinfo             the path's info, signed with the
//	                              daemon's secret-key-files
//	GET /nar/HASH-NARHASH.nar     the path's NAR, uncompressed
//
// HEAD works for each. A NAR URL names the path's NAR hash, so a URL from
// an old narinfo of a path since deleted and added again with other
// contents is not served. A path is held by a temporary root while its
// NAR is sent, and counts as used (the size budget's last use).
package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/nixyard/nixyard/internal/nix/narinfo"
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// DefaultPriority is the cache's priority in nix-cache-info (nix-serve's;
// cache.nixos.org has 40, so a host nearby is asked first).
const DefaultPriority = 30

// Config is what the server signs with and says of itself.
type Config struct {
	// SecretKeys sign each narinfo (nix.conf secret-key-files); the
	// signatures the path already has are served too.
	SecretKeys []signature.SecretKey
	// Priority is nix-cache-info's; 0 means DefaultPriority.
	Priority int
	Logger   *slog.Logger
}

// maxNARs bounds the NARs sent at once; more requests are answered 503.
const maxNARs = 32

// narWriteTimeout bounds each write of a NAR to a client.
const narWriteTimeout = time.Minute

// Server is an http.Handler serving a store as a binary cache.
type Server struct {
	st   *store.Store
	cfg  Config
	log  *slog.Logger
	nars chan struct{} // a token per NAR being sent
}

// New returns a Server for st.
func New(st *store.Store, cfg Config) *Server {
	if cfg.Priority == 0 {
		cfg.Priority = DefaultPriority
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{st: st, cfg: cfg, log: log, nars: make(chan struct{}, maxNARs)}
}

// Sending counts the NARs being sent (a stopping daemon waits for them).
func (s *Server) Sending() int { return len(s.nars) }

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	path := r.URL.Path
	switch {
	case path == "/nix-cache-info":
		ci := narinfo.NixCacheInfo{StoreDir: string(s.st.Dir()), WantMassQuery: true, Priority: s.cfg.Priority, HasPriority: true}
		s.send(w, "text/x-nix-cache-info", ci.Marshal())
	case strings.HasPrefix(path, "/nar/") && strings.HasSuffix(path, ".nar"):
		s.serveNAR(w, r, strings.TrimSuffix(strings.TrimPrefix(path, "/nar/"), ".nar"))
	case strings.HasSuffix(path, ".narinfo") && !strings.Contains(path[1:], "/"):
		s.serveNarinfo(w, r, strings.TrimSuffix(path[1:], ".narinfo"))
	default:
		http.NotFound(w, r)
	}
}

func (s *Server) send(w http.ResponseWriter, contentType string, body []byte) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Write(body)
}

// lookup finds the valid path with hash part hashPart and its info; ok
// is false (and the reply sent) if there is none.
func (s *Server) lookup(ctx context.Context, w http.ResponseWriter, r *http.Request, hashPart string) (*store.PathInfo, bool) {
	p, err := s.st.QueryPathFromHashPart(ctx, hashPart)
	if err == nil {
		var info *store.PathInfo
		if info, err = s.st.QueryPathInfo(ctx, p); err == nil {
			return info, true
		}
	}
	if errors.Is(err, store.ErrNotValid) || errors.Is(err, storepath.ErrBadPath) {
		http.NotFound(w, r)
		return nil, false
	}
	s.log.Warn("binary cache: looking up a path", "hash", hashPart, "err", err)
	http.Error(w, "internal error", http.StatusInternalServerError)
	return nil, false
}

// narURL is where a path's NAR is served.
func narURL(info *store.PathInfo) string {
	return fmt.Sprintf("nar/%s-%s.nar", info.Path.HashPart(), info.NarHash.NixBase32())
}

func (s *Server) serveNarinfo(w http.ResponseWriter, r *http.Request, hashPart string) {
	info, ok := s.lookup(r.Context(), w, r, hashPart)
	if !ok {
		return
	}
	ni, err := signedNarinfo(s.st.Dir(), info, s.cfg.SecretKeys)
	if err != nil {
		s.log.Warn("binary cache: a path's content address does not parse", "path", info.Path.String(), "err", err)
	}
	ni.URL, ni.Compression = narURL(info), "none"
	ni.FileHash, ni.FileSize = info.NarHash, info.NarSize // served uncompressed
	s.send(w, "text/x-nix-narinfo", ni.Marshal(s.st.Dir()))
}

func (s *Server) serveNAR(w http.ResponseWriter, r *http.Request, name string) {
	hashPart, narHash, ok := strings.Cut(name, "-")
	if !ok {
		http.NotFound(w, r)
		return
	}
	ctx := r.Context()
	info, ok := s.lookup(ctx, w, r, hashPart)
	if !ok {
		return
	}
	if info.NarHash.NixBase32() != narHash {
		http.NotFound(w, r) // the path now has other contents
		return
	}
	select {
	case s.nars <- struct{}{}:
		defer func() { <-s.nars }()
	default:
		w.Header().Set("Retry-After", "5")
		http.Error(w, "too many NARs being sent; try again", http.StatusServiceUnavailable)
		return
	}
	ss := s.st.OpenSession()
	defer ss.Close()
	if err := ss.AddTempRoot(ctx, info.Path); err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	// Under the root the collector cannot take it from now on; it may have
	// taken it (and the path been made again) since the lookup.
	if ok, err := s.st.IsValidPathFresh(ctx, info.Path); err != nil {
		s.log.Warn("binary cache: checking a path", "path", info.Path.String(), "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	} else if !ok {
		http.NotFound(w, r)
		return
	}
	if now, err := s.st.QueryPathInfo(ctx, info.Path); err != nil || !now.NarHash.Equal(info.NarHash) {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "application/x-nix-nar")
	w.Header().Set("Content-Length", strconv.FormatUint(info.NarSize, 10))
	if r.Method == http.MethodHead {
		return
	}
	out := &deadlineWriter{w: w, rc: http.NewResponseController(w)}
	if err := s.st.NarFromPath(ctx, info.Path, out); err != nil && ctx.Err() == nil {
		// Too late for a status: the client sees a short body.
		s.log.Warn("binary cache: sending a NAR", "path", info.Path.String(), "err", err)
	}
}

// deadlineWriter gives each write to a client narWriteTimeout: a client
// that stops reading does not hold its temporary root for ever.
type deadlineWriter struct {
	w  io.Writer
	rc *http.ResponseController
}

func (d *deadlineWriter) Write(b []byte) (int, error) {
	d.rc.SetWriteDeadline(time.Now().Add(narWriteTimeout))
	return d.w.Write(b)
}
