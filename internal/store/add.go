package store

import (
	"context"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"
	gohash "hash"
	"io"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/nixbase32"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// AddOptions are the flags of an addition.
type AddOptions struct{ Repair, CheckSigs bool }

// Batch limits of AddMultipleToStoreNar. Paths are made durable and
// registered in the background, in batches, while the next paths are
// received and unpacked: a batch is handed over once it holds
// batchMinPaths paths or batchMinBytes NAR bytes and the previous batch is
// done. If the previous batch is still being made durable, the current one
// grows, up to batchMaxPaths paths or batchMaxBytes bytes; then the stream
// waits.
const (
	batchMinPaths = 64
	batchMinBytes = 16 << 20
	batchMaxPaths = 512
	batchMaxBytes = 512 << 20
)

// addTiming, set by NIXYARD_DEBUG_ADD_TIMING=1 in the environment, makes
// AddMultipleToStoreNar log a wall-clock breakdown to stderr: time spent
// receiving and unpacking, waiting for background flushes, and each flush's
// sync and registration.
var addTiming = os.Getenv("NIXYARD_DEBUG_ADD_TIMING") == "1"

func timingf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "nixyard add timing: "+format+"\n", args...)
}

// pendingPath is an unpacked, checked path waiting to be made durable and
// registered.
type pendingPath struct {
	info       PathInfo
	lock       *pathLock
	drvOutputs map[string]storepath.Path
	epoch      uint64 // Store.syncEpoch before its files were written
}

// batch adds paths: each is unpacked under its path lock, and a flush makes
// all pending paths durable and registers them in one transaction.
type batch struct {
	s       *Store
	opts    AddOptions
	pending []*pendingPath
	inBatch map[storepath.Path]bool // pending, being flushed or flushed by this batch
	bytes   uint64
	rooted  []storepath.Path // in-flight temporary roots to drop at the end
	job     *flushJob        // the previous paths, being flushed in the background

	tUnpack, tWait, tFinal time.Duration // for addTiming
	nFlush                 atomic.Int64
}

// flushJob makes paths durable and registers them in a goroutine of its
// own; done is closed when it has finished (err set). On error it has
// deleted and unlocked its paths.
type flushJob struct {
	paths []*pendingPath
	done  chan struct{}
	err   error
}

func (s *Store) newBatch(opts AddOptions) *batch {
	return &batch{s: s, opts: opts, inBatch: map[storepath.Path]bool{}}
}

// AddToStoreNar adds one path from its NAR. It reads exactly one NAR from
// nar (never past its end), checks NarHash, NarSize and, if set, CA against
// info, checks signatures when opts.CheckSigs, RequireSigs and the path is
// not content-addressed, and registers the path atomically with its
// references, which must all be valid (or the path itself). If the path is
// already valid (and !opts.Repair) the NAR is read and discarded; with
// opts.Repair it replaces the path's files (RepairPathNar). On error
// nothing is registered and nothing is left at the path; the NAR may be
// partly read. Callers that need the path to outlive a concurrent garbage
// collection hold a Session temporary root on it. Concurrent calls are
// made durable and registered together (group commit, groupcommit.go).
func (s *Store) AddToStoreNar(ctx context.Context, info PathInfo, nr io.Reader, opts AddOptions) error {
	s.AutoGC(ctx, true)
	if opts.Repair {
		if ok, err := s.IsValidPathFresh(ctx, info.Path); err != nil {
			return err
		} else if ok {
			if _, err := s.checkNARInfo(info, opts.CheckSigs, "repairing"); err != nil {
				return err
			}
			return s.RepairPathNar(ctx, info, nr)
		}
	}
	b := s.newBatch(opts)
	defer b.abort()
	if err := b.add(ctx, info, nr); err != nil {
		return err
	}
	if len(b.pending) == 0 {
		return nil // already valid
	}
	// One path: committed together with other callers' (groupcommit.go).
	pp := b.pending[0]
	b.pending = nil
	return s.commitPath(ctx, pp)
}

// AddMultipleToStoreNar adds a stream of paths: next returns each path's
// info and a reader of exactly its NAR, and io.EOF after the last. Paths
// are made durable and registered in batches; paths may refer to earlier
// paths of the stream. On error, the paths of completed batches stay valid.
func (s *Store) AddMultipleToStoreNar(ctx context.Context, next func() (PathInfo, io.Reader, error), opts AddOptions) error {
	s.AutoGC(ctx, true)
	b := s.newBatch(opts)
	defer b.abort()
	if addTiming {
		start := time.Now()
		defer func() {
			timingf("stream: %d paths in %v: receiving+unpacking %v, waiting for flushes %v (final %v), %d flushes",
				len(b.inBatch), time.Since(start).Round(time.Millisecond), b.tUnpack.Round(time.Millisecond),
				b.tWait.Round(time.Millisecond), b.tFinal.Round(time.Millisecond), b.nFlush.Load())
		}()
	}
	for {
		t0 := time.Now()
		info, nr, err := next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if err := b.add(ctx, info, nr); err != nil {
			return err
		}
		b.tUnpack += time.Since(t0)
		if len(b.pending) >= batchMaxPaths || b.bytes >= batchMaxBytes {
			if err := b.wait(); err != nil {
				return err
			}
		}
		if (len(b.pending) >= batchMinPaths || b.bytes >= batchMinBytes) && b.idle() {
			if err := b.startFlush(ctx); err != nil {
				return err
			}
		}
	}
	t0 := time.Now()
	err := b.flush(ctx)
	b.tFinal = time.Since(t0)
	return err
}

// discardNAR reads one NAR to its end.
func discardNAR(r io.Reader) error {
	nr := nar.NewReader(r)
	for {
		if _, err := nr.Next(); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return err
		}
		if _, err := io.Copy(io.Discard, nr); err != nil {
			return err
		}
	}
}

// narDigest takes a NAR's SHA-256 and size as the NAR is written to it:
// its NarHash and NarSize.
type narDigest struct {
	sha gohash.Hash
	n   uint64
}

func newNARDigest() *narDigest { return &narDigest{sha: hash.SHA256.New()} }

func (d *narDigest) Write(p []byte) (int, error) {
	d.sha.Write(p)
	d.n += uint64(len(p))
	return len(p), nil
}

// Sum returns the NAR's hash and size.
func (d *narDigest) Sum() (hash.Hash, uint64) { return hash.FromHasher(hash.SHA256, d.sha), d.n }

func (b *batch) add(ctx context.Context, info PathInfo, r io.Reader) error {
	s := b.s
	abs := s.abs(info.Path)
	if info.Path.IsZero() {
		return errors.New("store: adding a path without a name")
	}
	ca, err := s.checkNARInfo(info, b.opts.CheckSigs, "adding")
	if err != nil {
		return err
	}
	if b.inBatch[info.Path] {
		return discardNAR(r)
	}
	if err := s.roots.add(ctx, info.Path); err != nil {
		return err
	}
	b.rooted = append(b.rooted, info.Path)

	valid, err := s.IsValidPathFresh(ctx, info.Path) // discarding the NAR must not trust the cache
	if err != nil {
		return err
	}
	if valid && !b.opts.Repair {
		return discardNAR(r)
	}
	if valid {
		// A repair: unpacked beside the path and swapped in, never over
		// it. The batch's own paths first, so that no lock is held.
		if err := b.flush(ctx); err != nil {
			return err
		}
		return s.RepairPathNar(ctx, info, r)
	}
	lock, err := s.tryLockPath(ctx, info.Path)
	if err != nil {
		return err
	}
	if lock == nil {
		// Someone else is adding it. Do not wait while holding the locks
		// of this batch (two batches could wait on each other).
		if err := b.flush(ctx); err != nil {
			return err
		}
		if lock, err = s.lockPath(ctx, info.Path); err != nil {
			return err
		}
	}
	if valid, err = s.IsValidPathFresh(ctx, info.Path); err != nil || (valid && !b.opts.Repair) {
		lock.unlock()
		if err != nil {
			return err
		}
		return discardNAR(r)
	}
	for _, ref := range info.References {
		if ref == info.Path || b.inBatch[ref] {
			continue
		}
		ok, err := s.IsValidPathFresh(ctx, ref)
		if err != nil {
			lock.unlock()
			return err
		}
		if !ok {
			lock.unlock()
			return invalidReference(abs, s.abs(ref))
		}
	}
	epoch := s.syncEpoch()
	pp, err := s.unpack(ctx, info, ca, r, s.RealPath(info.Path))
	if err != nil {
		lock.unlock()
		return err
	}
	pp.lock, pp.epoch = lock, epoch
	b.pending = append(b.pending, pp)
	b.inBatch[info.Path] = true
	b.bytes += info.NarSize
	return nil
}

// checkCAPath checks that a content-addressed path is where its content
// address puts it.
func (s *Store) checkCAPath(info PathInfo, ca contentaddress.CA) error {
	var refs []storepath.Path
	self := false
	for _, r := range info.References {
		if r == info.Path {
			self = true
		} else {
			refs = append(refs, r)
		}
	}
	want, err := ca.StorePath(s.dir, info.Path.Name(), refs, self)
	if err != nil || want != info.Path {
		return fmt.Errorf("store: cannot add path '%s' to the Nix store because it claims to be content-addressed but isn't", s.abs(info.Path))
	}
	return nil
}

// unpack restores the NAR at realPath (after deleting an invalid leftover)
// with canonical metadata and checks it against info. On error nothing is
// left.
func (s *Store) unpack(ctx context.Context, info PathInfo, ca contentaddress.CA, r io.Reader, realPath string) (_ *pendingPath, err error) {
	abs := s.abs(info.Path)
	if err := removeAll(realPath); err != nil {
		return nil, fmt.Errorf("store: deleting leftover %s: %w", realPath, err)
	}
	defer func() {
		if err != nil {
			removeAll(realPath)
		}
	}()
	dig := newNARDigest()
	var w io.Writer = dig
	caHasher := dig.sha
	if ca.Method == contentaddress.NAR && ca.Hash.Algo != hash.SHA256 {
		caHasher = ca.Hash.Algo.New()
		w = io.MultiWriter(dig, caHasher)
	}
	// Restored with the store's final modes and mtimes: no canonicalisation
	// walk afterwards.
	if err := nar.RestoreCanonical(ctx, io.TeeReader(r, w), realPath); err != nil {
		return nil, fmt.Errorf("store: unpacking %s: %w", abs, err)
	}
	got, size := dig.Sum()
	if !got.Equal(info.NarHash) {
		return nil, errors.New("store: " + hint.Fmt("hash mismatch importing path '%s';\n  specified: %s\n  got:       %s", abs, info.NarHash, got))
	}
	if size != info.NarSize {
		return nil, fmt.Errorf("store: size mismatch importing path '%s';\n  specified: %d\n  got:       %d", abs, info.NarSize, size)
	}
	if !ca.IsZero() {
		var actual hash.Hash
		switch ca.Method {
		case contentaddress.NAR:
			actual = hash.FromHasher(ca.Hash.Algo, caHasher)
		case contentaddress.Flat, contentaddress.Text:
			if actual, err = hashFile(realPath, ca.Hash.Algo); err != nil {
				return nil, fmt.Errorf("store: content address of %s: %w", abs, err)
			}
		}
		if !actual.Equal(ca.Hash) {
			return nil, errors.New("store: " + hint.Fmt("ca hash mismatch importing path '%s';\n  specified: %s\n  got:       %s", abs, ca.Hash, actual))
		}
	}
	pp := &pendingPath{info: info}
	if info.Path.IsDerivation() {
		if pp.drvOutputs, err = s.readDrvOutputs(ctx, info.Path, realPath); err != nil {
			return nil, err
		}
	}
	s.optimiseNew(ctx, realPath)
	return pp, nil
}

// hashFile hashes the contents of a regular file (not following symlinks).
func hashFile(path string, algo hash.Algo) (hash.Hash, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return hash.Hash{}, err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		return hash.Hash{}, fmt.Errorf("%s is not a regular file", path)
	}
	h := algo.New()
	if _, err := io.Copy(h, f); err != nil {
		return hash.Hash{}, fmt.Errorf("reading %s: %w", path, err)
	}
	return hash.FromHasher(algo, h), nil
}

// flush makes the pending paths durable and registers them in one
// transaction (after any batch being flushed in the background), then
// releases their locks. On error the pending paths are deleted.
func (b *batch) flush(ctx context.Context) error {
	if err := b.startFlush(ctx); err != nil {
		return err
	}
	return b.wait()
}

// idle reports whether no background flush is running.
func (b *batch) idle() bool {
	if b.job == nil {
		return true
	}
	select {
	case <-b.job.done:
		return true
	default:
		return false
	}
}

// wait waits for the background flush, if any, and returns its error.
func (b *batch) wait() error {
	j := b.job
	if j == nil {
		return nil
	}
	t0 := time.Now()
	<-j.done
	b.tWait += time.Since(t0)
	b.job = nil
	if j.err != nil {
		for _, pp := range j.paths {
			delete(b.inBatch, pp.info.Path)
		}
		return j.err
	}
	return nil
}

// startFlush waits for the previous background flush and hands the
// pending paths to a new one. Batches are registered in the order they
// were added, so references (earlier in the stream) are registered first;
// a path counts as added only once the flush that holds it has finished.
func (b *batch) startFlush(ctx context.Context) error {
	if err := b.wait(); err != nil {
		return err
	}
	if len(b.pending) == 0 {
		return nil
	}
	j := &flushJob{paths: b.pending, done: make(chan struct{})}
	b.pending = nil
	b.bytes = 0
	b.job = j
	go func() {
		defer close(j.done)
		j.err = b.s.flushPaths(ctx, j.paths)
		b.nFlush.Add(1)
	}()
	return nil
}

// flushPaths makes paths durable and registers them in one transaction,
// then releases their locks. On error the paths are deleted and unlocked.
func (s *Store) flushPaths(ctx context.Context, paths []*pendingPath) error {
	t0 := time.Now()
	err := s.syncPending(paths)
	if err != nil {
		err = fmt.Errorf("making paths durable: %w", err)
	}
	t1 := time.Now()
	if err == nil {
		if err = s.register(ctx, paths); err != nil && !errors.Is(err, ErrNotValid) {
			err = fmt.Errorf("registering: %w", err)
		}
	}
	if addTiming {
		var n uint64
		for _, pp := range paths {
			n += pp.info.NarSize
		}
		timingf("flush: %d paths, %d MB: sync %v, register %v", len(paths), n>>20,
			t1.Sub(t0).Round(time.Millisecond), time.Since(t1).Round(time.Millisecond))
	}
	if err != nil {
		for _, pp := range paths {
			removeAll(s.RealPath(pp.info.Path))
			pp.lock.unlock()
		}
		return fmt.Errorf("store: %w", err)
	}
	for _, pp := range paths {
		pp.lock.unlock()
	}
	return nil
}

// syncPending makes unpacked paths durable (syncTrees), failing them all
// if a writeback error was reported since the first of them was written.
func (s *Store) syncPending(paths []*pendingPath) error {
	if len(paths) == 0 {
		return nil
	}
	trees := make([]string, len(paths))
	var written uint64
	since := paths[0].epoch
	for i, pp := range paths {
		trees[i] = s.RealPath(pp.info.Path)
		written += pp.info.NarSize
		since = min(since, pp.epoch)
	}
	return s.syncTrees(trees, written, since)
}

// abort waits for any background flush, deletes and unlocks the pending
// paths and drops the batch's roots.
func (b *batch) abort() {
	b.wait()
	for _, pp := range b.pending {
		removeAll(b.s.RealPath(pp.info.Path))
		pp.lock.unlock()
		delete(b.inBatch, pp.info.Path)
	}
	b.pending = nil
	for _, p := range b.rooted {
		b.s.roots.remove(p)
	}
	b.rooted = nil
}

// register writes ValidPaths, Refs and DerivationOutputs rows for paths in
// one transaction, as Nix's registerValidPaths. It is not cancellable: its
// paths are already durable, and with a cancellable context every statement
// would cost a goroutine or two (see pointCtx).
func (s *Store) register(ctx context.Context, paths []*pendingPath) error {
	ctx = context.WithoutCancel(ctx)
	touched := make([]storepath.Path, len(paths))
	for i, pp := range paths {
		touched[i] = pp.info.Path
	}
	return s.db.write(ctx, touched, func(tx *sql.Tx) error { return s.registerTx(ctx, tx, paths) })
}

// registerTx is register's transaction body.
func (s *Store) registerTx(ctx context.Context, tx *sql.Tx, paths []*pendingPath) error {
	now := time.Now().Unix()
	ids := make([]int64, len(paths))
	for i, pp := range paths {
		info := &pp.info
		abs := s.abs(info.Path)
		regTime := now
		if !info.RegistrationTime.IsZero() && info.RegistrationTime.Unix() > 0 {
			regTime = info.RegistrationTime.Unix()
		}
		sigs := nullString(strings.Join(sortedSigs(info.Sigs), " "))
		ca := nullString(info.CA)
		narSize := sql.NullInt64{Int64: int64(info.NarSize), Valid: info.NarSize != 0}
		ultimate := sql.NullInt64{Int64: 1, Valid: info.Ultimate}
		var id int64
		err := tx.StmtContext(ctx, s.db.wPathID).QueryRowContext(ctx, abs).Scan(&id)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			deriver := sql.NullString{}
			if !info.Deriver.IsZero() {
				deriver = sql.NullString{String: s.abs(info.Deriver), Valid: true}
			}
			res, err := tx.StmtContext(ctx, s.db.wInsertPath).ExecContext(ctx,
				abs, info.NarHash.StringBase16(), regTime, deriver, narSize, ultimate, sigs, ca)
			if err != nil {
				return fmt.Errorf("registering %s: %w", abs, err)
			}
			if id, err = res.LastInsertId(); err != nil {
				return fmt.Errorf("registering %s: %w", abs, err)
			}
		case err != nil:
			return fmt.Errorf("registering %s: %w", abs, err)
		default:
			// Re-registered (a repair): the same contents keep the
			// signatures and trust they had, whoever sent them again.
			var oldHash, oldSigs sql.NullString
			var oldUltimate sql.NullInt64
			if err := tx.StmtContext(ctx, s.db.wOldPath).QueryRowContext(ctx, id).Scan(&oldHash, &oldSigs, &oldUltimate); err != nil {
				return fmt.Errorf("updating %s: %w", abs, err)
			}
			if oldHash.String == info.NarHash.StringBase16() {
				merged := append(strings.Fields(oldSigs.String), info.Sigs...)
				sigs = nullString(strings.Join(sortedSigs(merged), " "))
				if oldUltimate.Valid && oldUltimate.Int64 != 0 {
					ultimate = sql.NullInt64{Int64: 1, Valid: true}
				}
			}
			if _, err := tx.StmtContext(ctx, s.db.wUpdatePath).ExecContext(ctx,
				narSize, info.NarHash.StringBase16(), ultimate, sigs, ca, abs); err != nil {
				return fmt.Errorf("updating %s: %w", abs, err)
			}
		}
		ids[i] = id
		if pp.drvOutputs != nil {
			for name, out := range pp.drvOutputs {
				if _, err := tx.StmtContext(ctx, s.db.wInsertDrvOutput).ExecContext(ctx, id, name, s.abs(out)); err != nil {
					return fmt.Errorf("registering outputs of %s: %w", abs, err)
				}
			}
		}
	}
	for i, pp := range paths {
		for _, ref := range pp.info.References {
			var refID int64
			err := tx.StmtContext(ctx, s.db.wPathID).QueryRowContext(ctx, s.abs(ref)).Scan(&refID)
			if errors.Is(err, sql.ErrNoRows) {
				return invalidReference(s.abs(pp.info.Path), s.abs(ref))
			}
			if err != nil {
				return fmt.Errorf("reference %s of %s: %w", s.abs(ref), s.abs(pp.info.Path), err)
			}
			if _, err := tx.StmtContext(ctx, s.db.wInsertRef).ExecContext(ctx, ids[i], refID); err != nil {
				return fmt.Errorf("reference %s of %s: %w", s.abs(ref), s.abs(pp.info.Path), err)
			}
		}
	}
	return nil
}

func nullString(s string) sql.NullString { return sql.NullString{String: s, Valid: s != ""} }

// sortedSigs returns sigs sorted without duplicates, as Nix's StringSet.
func sortedSigs(sigs []string) []string {
	out := slices.Clone(sigs)
	slices.Sort(out)
	return slices.Compact(out)
}

// AddToStoreContent adds content under its content address: data is a NAR
// for method NAR, raw bytes (read to EOF) for Flat and Text. A Text .drv
// gets its DerivationOutputs registered. Paths are computed as Nix does
// (Text paths may have references; Flat paths and non-sha256 NAR paths
// may not). If the path is already valid (and !repair) its info is returned.
func (s *Store) AddToStoreContent(ctx context.Context, name string, method contentaddress.Method, algo hash.Algo, refs []storepath.Path, data io.Reader, repair bool) (*PathInfo, error) {
	s.AutoGC(ctx, true)
	if err := storepath.CheckName(name); err != nil {
		return nil, fmt.Errorf("store: adding %q: %w", name, err)
	}
	if method == contentaddress.Text && algo != hash.SHA256 {
		return nil, fmt.Errorf("store: adding %q: text content needs sha256", name)
	}
	// The content goes to <random hash>-nixyard-tmp-<pid>/x first: only
	// once it is hashed is its path known.
	tmpDir, done, err := s.tempDir(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	epoch := s.syncEpoch()
	tmp := tmpDir + "/x"

	h := algo.New()
	var narHash hash.Hash
	var narSize uint64
	switch method {
	case contentaddress.NAR:
		dig := newNARDigest()
		if err := nar.Restore(ctx, io.TeeReader(data, io.MultiWriter(h, dig)), tmp); err != nil {
			return nil, fmt.Errorf("store: adding %q: %w", name, err)
		}
		narHash, narSize = dig.Sum()
	case contentaddress.Flat, contentaddress.Text:
		if err := writeStream(ctx, tmp, io.TeeReader(data, h)); err != nil {
			return nil, fmt.Errorf("store: adding %q: %w", name, err)
		}
		var err error
		if narHash, narSize, err = hashPathNAR(tmp); err != nil {
			return nil, fmt.Errorf("store: adding %q: %w", name, err)
		}
	default:
		return nil, fmt.Errorf("store: adding %q: unknown content address method %d", name, method)
	}
	ca := contentaddress.CA{Method: method, Hash: hash.FromHasher(algo, h)}
	p, err := ca.StorePath(s.dir, name, refs, false)
	if err != nil {
		return nil, fmt.Errorf("store: adding %q: %w", name, err)
	}
	info := PathInfo{Path: p, NarHash: narHash, NarSize: narSize, References: storepath.Sort(slices.Clone(refs)), CA: ca.String()}
	if err := s.addUnpacked(ctx, info, tmp, repair, epoch); err != nil {
		return nil, err
	}
	return s.QueryPathInfo(ctx, p)
}

// writeStream writes r to a new file at path.
func writeStream(ctx context.Context, path string, r io.Reader) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	// A pooled buffer, as nar.Restore writes files with: an allocation of
	// its own for each small addition (nix-instantiate sends one per
	// derivation) cost more than writing it.
	bp := nar.CopyBuffer()
	defer nar.PutCopyBuffer(bp)
	buf := *bp
	for {
		if err := ctx.Err(); err != nil {
			f.Close()
			return err
		}
		n, rerr := r.Read(buf)
		if n > 0 {
			if _, err := f.Write(buf[:n]); err != nil {
				f.Close()
				return fmt.Errorf("writing %s: %w", path, err)
			}
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			f.Close()
			return rerr
		}
	}
	return f.Close()
}

// addUnpacked moves a checked tree at tmp into place as info.Path and
// registers it, under the path lock. epoch is Store.syncEpoch from before
// tmp was written.
func (s *Store) addUnpacked(ctx context.Context, info PathInfo, tmp string, repair bool, epoch uint64) error {
	abs := s.abs(info.Path)
	if err := s.roots.add(ctx, info.Path); err != nil {
		return err
	}
	defer s.roots.remove(info.Path)
	realPath := s.RealPath(info.Path)
	lock, err := s.lockPath(ctx, info.Path)
	if err != nil {
		return err
	}
	defer func() {
		if lock != nil {
			lock.unlock()
		}
	}()
	valid, err := s.IsValidPathFresh(ctx, info.Path)
	if err != nil || (valid && !repair) {
		return err
	}
	for _, ref := range info.References {
		if ok, err := s.IsValidPathFresh(ctx, ref); err != nil {
			return err
		} else if !ok {
			return invalidReference(abs, s.abs(ref))
		}
	}
	pp := &pendingPath{info: info}
	if info.Path.IsDerivation() {
		if pp.drvOutputs, err = s.readDrvOutputs(ctx, info.Path, tmp); err != nil {
			return err
		}
	}
	if err := nar.Canonicalise(tmp); err != nil {
		return fmt.Errorf("store: %s: %w", abs, err)
	}
	if valid {
		// A repair (only then is a valid path added again): made durable,
		// then swapped in atomically; the old files go with tmp.
		if err := s.syncTrees([]string{tmp}, info.NarSize, epoch); err != nil {
			return fmt.Errorf("store: %s: %w", abs, err)
		}
		if err := exchange(tmp, realPath); err != nil {
			return fmt.Errorf("store: repairing %s: %w", abs, err)
		}
		if err := fsyncPath(s.realDir); err == nil {
			err = s.register(ctx, []*pendingPath{pp})
		}
		if err != nil {
			exchange(tmp, realPath)
			return fmt.Errorf("store: repairing %s: %w", abs, err)
		}
		return nil
	}
	// Not for a repair: the store's links may be what was damaged, and
	// optimising checks them by size only.
	s.optimiseNew(ctx, tmp)
	// Moved into place first, then made durable there with its entry in
	// the store's directory by one sync (one journal commit, not two) and
	// registered, together with other callers' additions (commitPath), as
	// AddToStoreNar's paths are: until it is registered the path is
	// invalid whatever a crash leaves of it, and the next addition deletes
	// the leftover under the path's lock.
	if err := removeAll(realPath); err != nil {
		return fmt.Errorf("store: deleting leftover %s: %w", realPath, err)
	}
	if err := os.Rename(tmp, realPath); err != nil {
		return fmt.Errorf("store: moving %s into place: %w", abs, err)
	}
	pp.lock, pp.epoch = lock, epoch
	lock = nil // commitPath releases it
	return s.commitPath(ctx, pp)
}

// AddSignatures adds signatures to a valid path's info (kept as a sorted
// set, as Nix does).
func (s *Store) AddSignatures(ctx context.Context, p storepath.Path, sigs []string) error {
	abs := s.abs(p)
	err := s.db.write(ctx, []storepath.Path{p}, func(tx *sql.Tx) error {
		var cur sql.NullString
		err := tx.QueryRowContext(ctx, "select sigs from ValidPaths where path = ?", abs).Scan(&cur)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("path '%s': %w", abs, ErrNotValid)
		}
		if err != nil {
			return err
		}
		all := append(strings.Fields(cur.String), sigs...)
		_, err = tx.ExecContext(ctx, "update ValidPaths set sigs = ? where path = ?", nullString(strings.Join(sortedSigs(all), " ")), abs)
		return err
	})
	if err != nil {
		return fmt.Errorf("store: adding signatures to %s: %w", abs, err)
	}
	return nil
}

// NarFromPath writes the NAR serialisation of a valid path to w.
func (s *Store) NarFromPath(ctx context.Context, p storepath.Path, w io.Writer) error {
	if ok, err := s.IsValidPath(ctx, p); err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("store: path '%s': %w", s.abs(p), ErrNotValid)
	}
	if err := nar.DumpPath(w, s.RealPath(p)); err != nil {
		return fmt.Errorf("store: dumping %s: %w", s.abs(p), err)
	}
	return nil
}

// checkNARInfo checks what can be checked of a path's info before its NAR
// is read: a sha256 NAR hash, a well-formed content address that matches
// the path, and with checkSigs (under require-sigs) a trusted signature
// unless content-addressed. It returns the parsed content address.
func (s *Store) checkNARInfo(info PathInfo, checkSigs bool, doing string) (contentaddress.CA, error) {
	abs := s.abs(info.Path)
	var ca contentaddress.CA
	if info.NarHash.Algo != hash.SHA256 {
		return ca, fmt.Errorf("store: %s %s: NAR hash must be sha256, got %s", doing, abs, info.NarHash.Algo)
	}
	if info.CA != "" {
		var err error
		if ca, err = contentaddress.Parse(info.CA); err != nil {
			return ca, fmt.Errorf("store: %s %s: %w", doing, abs, err)
		}
		if err := s.checkCAPath(info, ca); err != nil {
			return ca, err
		}
	}
	if checkSigs && s.cfg.RequireSigs && ca.IsZero() && !s.sigs.trusted(s.dir, &info) {
		return ca, errors.New("store: " + hint.Fmt("cannot add path '%s' because it lacks a valid signature", abs))
	}
	return ca, nil
}

// tempDir makes a temporary directory in the store's directory,
// <random hash>-nixyard-tmp-<pid>, with a temporary root so that no
// garbage collector takes it; done removes it and the root.
func (s *Store) tempDir(ctx context.Context) (dir string, done func(), err error) {
	var rnd [20]byte
	rand.Read(rnd[:])
	tmpPath, err := storepath.ParseBase(nixbase32.EncodeToString(rnd[:]) + tempDirSuffix + fmt.Sprint(os.Getpid()))
	if err != nil {
		return "", nil, fmt.Errorf("store: temporary directory name: %w", err)
	}
	if err := s.roots.add(ctx, tmpPath); err != nil {
		return "", nil, err
	}
	dir = s.RealPath(tmpPath)
	if err := os.Mkdir(dir, 0o700); err != nil {
		s.roots.remove(tmpPath)
		return "", nil, fmt.Errorf("store: creating %s: %w", dir, err)
	}
	return dir, func() {
		removeAll(dir)
		s.roots.remove(tmpPath)
	}, nil
}

// RepairPathNar replaces the files of the valid path info.Path with the
// NAR read from r (nix-store --verify --repair, from a binary cache). The
// NAR is unpacked beside the path and checked against info (hash, size,
// content address) while the old files stay; once it is durable, it is
// swapped in (addUnpacked) and the registration updated with info. A
// failure before the swap leaves the path as it was.
func (s *Store) RepairPathNar(ctx context.Context, info PathInfo, r io.Reader) error {
	ca, err := s.checkNARInfo(info, false, "repairing")
	if err != nil {
		return err
	}
	tmpDir, done, err := s.tempDir(ctx)
	if err != nil {
		return err
	}
	defer done()
	epoch := s.syncEpoch()
	fresh := tmpDir + "/new"
	if _, err := s.unpack(ctx, info, ca, r, fresh); err != nil {
		return err
	}
	// addUnpacked swaps it in (the old files end up at fresh, removed
	// with tmpDir).
	return s.addUnpacked(ctx, info, fresh, true, epoch)
}

// exchange swaps two paths atomically (renameat2 RENAME_EXCHANGE), or, if
// b does not exist, renames a to b.
func exchange(a, b string) error {
	err := unix.Renameat2(unix.AT_FDCWD, a, unix.AT_FDCWD, b, unix.RENAME_EXCHANGE)
	if errors.Is(err, unix.ENOENT) {
		if _, serr := os.Lstat(b); os.IsNotExist(serr) {
			return os.Rename(a, b)
		}
	}
	return err
}
