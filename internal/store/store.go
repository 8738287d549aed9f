// Package store is the local Nix store on disk, laid out exactly as Nix 2.8
// lays it out: the store directory, the SQLite database in Nix's schema
// (db/db.sqlite, schema version 10, WAL), the big lock, per-path lock files,
// temporary roots, GC roots, profiles, the garbage collector's lock and
// socket, the .links directory of the optimiser and build logs. Real Nix
// tools opening the same store directly (nix-store --store local?root=…)
// see a consistent store while this package uses it, and the other way
// round.
//
// A Store is safe for concurrent use by many goroutines. Reads go through a
// pool of SQLite connections; all writes go through one writer connection.
// Coordination with other processes uses Nix's own flock(2) locks, temporary
// root files and GC socket, so a real `nix-store --gc` next to a Store is
// safe, and so is a Store's garbage collection next to real `nix` processes.
//
// Not-found conditions are reported as errors wrapping ErrNotValid.
package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// Config says where a store lives and how it checks what is added to it.
type Config struct {
	StoreDir          storepath.Dir // logical store dir clients see, normally "/nix/store"
	RealStoreDir      string        // where files live: ROOT/nix/store for a chroot store, else == string(StoreDir)
	StateDir          string        // real path: ROOT/nix/var/nix, or NIX_STATE_DIR
	LogDir            string        // real path: ROOT/nix/var/log/nix, or NIX_LOG_DIR
	TrustedPublicKeys []string      // "name:base64", from nix.conf trusted-public-keys
	RequireSigs       bool          // nix.conf require-sigs (Nix default true)
	// KeepOutputs (nix.conf keep-outputs) makes the garbage collector keep
	// the outputs of live derivations; DiscardDerivations (nix.conf
	// keep-derivations = false) stops it keeping the derivations of live
	// outputs, which Nix does by default.
	KeepOutputs, DiscardDerivations bool
	// MinFree starts a garbage collection when the store's file system has
	// less space available, which frees up to MaxFree (nix.conf min-free,
	// max-free; 0 means none and no limit), checked at most once per
	// MinFreeCheckInterval (min-free-check-interval).
	MinFree, MaxFree     uint64
	MinFreeCheckInterval time.Duration
	// SizeBudget, if not 0, bounds the NAR sizes of the valid paths: the
	// automatic collection (checked as for MinFree) deletes the least
	// recently used dead paths until they sum to 90 % of it. See
	// lastuse.go.
	SizeBudget uint64
	// AutoOptimise hard-links the files of every new path to identical
	// files already in the store (nix.conf auto-optimise-store).
	AutoOptimise bool
	// ReservedSize is the size of <state>/db/reserved, a file kept so that
	// a garbage collection on a full disk has room to start (it deletes
	// it first), as Nix keeps it (nix.conf gc-reserved-space): 0 means
	// Nix's default, 8 MiB; a negative size, none.
	ReservedSize int64
	// BuildUsersGroup (nix.conf build-users-group): a daemon running as
	// root gives the store directory to root and this group, mode 01775,
	// as Nix does, so that builds outside the sandbox (as build users)
	// can make their outputs there.
	BuildUsersGroup string
	// SecretKeys sign the outputs of builds (nix.conf secret-key-files).
	SecretKeys []signature.SecretKey
	Logger     *slog.Logger
}

// schemaVersion is the database schema version of Nix 2.8 (nixSchemaVersion).
const schemaVersion = 10

// Store is an open local store. See the package comment.
type Store struct {
	cfg     Config
	dir     storepath.Dir
	realDir string
	log     *slog.Logger
	sigs    sigChecker

	bigLock *os.File  // db/big-lock, held shared while open
	fsSync  storeSync // see storeSync
	db      *database

	// caSchemaMu guards caSchemaOK: whether the tables of realisations
	// exist (ensureCASchema).
	caSchemaMu sync.Mutex
	caSchemaOK bool
	cache      infoCache // PathInfo of recently queried paths; see cache.go

	locks pathLocks // in-process half of the per-path locks

	roots tempRoots // temporary roots of this process (sessions and in-flight adds)

	commits commitQueue // group commit of single-path additions; see groupcommit.go

	gcSem         chan struct{}                                                     // holds a token while a garbage collection runs in this process
	gcGate        atomic.Pointer[func(ctx context.Context, log func(string)) error] // see SetGCGate
	beforeCollect atomic.Pointer[func(ctx context.Context)]                         // see SetBeforeCollect
	beforeRoots   atomic.Pointer[func()]                                            // see SetBeforeRoots

	autoGC  autoGC     // see AutoGC
	lastUse lastUses   // see Touch
	bg      background // the store's own goroutines, stopped by Close

	closeOnce sync.Once
	closeErr  error
}

// Open opens the store described by cfg, creating its directories, lock
// files and database if they are missing, as Nix's LocalStore constructor
// does. It holds the big lock in shared mode until Close.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.StoreDir == "" {
		cfg.StoreDir = storepath.DefaultDir
	}
	if cfg.RealStoreDir == "" {
		cfg.RealStoreDir = string(cfg.StoreDir)
	}
	if cfg.StateDir == "" || cfg.LogDir == "" {
		return nil, errors.New("store: StateDir and LogDir must be set")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Store{
		cfg:     cfg,
		dir:     cfg.StoreDir,
		realDir: filepath.Clean(cfg.RealStoreDir),
		log:     cfg.Logger,
		gcSem:   make(chan struct{}, 1),
	}
	s.bg.ctx, s.bg.cancel = context.WithCancel(context.WithoutCancel(ctx))
	var err error
	if s.sigs, err = newSigChecker(cfg.TrustedPublicKeys); err != nil {
		return nil, fmt.Errorf("store: trusted-public-keys: %w", err)
	}
	s.locks.init()
	s.roots.init(s)
	if err := s.createLayout(); err != nil {
		return nil, err
	}
	s.reserveSpace()

	lockPath := filepath.Join(cfg.StateDir, "db", "big-lock")
	s.bigLock, err = openLockFile(lockPath)
	if err != nil {
		return nil, err
	}
	if err := lockFD(ctx, s.bigLock, unix.LOCK_SH, func() { s.log.Info("waiting for the big Nix store lock...") }); err != nil {
		s.bigLock.Close()
		return nil, fmt.Errorf("store: locking %s: %w", lockPath, err)
	}

	if !syncfsReportsErrors() {
		s.log.Warn("this kernel does not report writeback errors to syncfs (Linux 5.8 does): a failed write may go unnoticed until the store is verified")
	}
	s.fsSync.dir, err = os.Open(s.realDir)
	if err != nil {
		s.bigLock.Close()
		return nil, fmt.Errorf("store: opening %s: %w", s.realDir, err)
	}
	s.db, err = openDatabase(ctx, filepath.Join(cfg.StateDir, "db"), s.log)
	if err != nil {
		s.fsSync.dir.Close()
		s.bigLock.Close()
		return nil, err
	}
	s.cache.init(s.db)
	s.cleanLeftovers()
	if cfg.SizeBudget > 0 {
		if err := s.loadLastUses(); err != nil {
			s.log.Warn("cannot read the last uses of paths; counting from their registration", "err", err)
		}
	}
	return s, nil
}

// shareStoreDir gives the store directory to root and the build users'
// group, mode 01775 (sticky: a build user cannot delete another's
// entries), when the daemon runs as root with a build-users-group, as
// Nix's LocalStore does each time it opens the store.
func (s *Store) shareStoreDir() error {
	name := s.cfg.BuildUsersGroup
	if name == "" || os.Getuid() != 0 {
		return nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		s.log.Warn("the group that build-users-group names does not exist", "group", name, "err", err)
		return nil
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return fmt.Errorf("store: group %s: gid %q: %w", name, g.Gid, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(s.realDir, &st); err != nil {
		return fmt.Errorf("store: %s: %w", s.realDir, err)
	}
	const perm = 0o1775
	if st.Uid == 0 && int(st.Gid) == gid && st.Mode&^unix.S_IFMT == perm {
		return nil
	}
	if err := unix.Chown(s.realDir, 0, gid); err != nil {
		return fmt.Errorf("store: giving %s to root and group %s: %w", s.realDir, name, err)
	}
	if err := unix.Chmod(s.realDir, perm); err != nil {
		return fmt.Errorf("store: setting the mode of %s: %w", s.realDir, err)
	}
	return nil
}

// createLayout makes the directories Nix's LocalStore constructor makes.
func (s *Store) createLayout() error {
	st := s.cfg.StateDir
	for _, d := range []string{
		s.realDir,
		filepath.Join(s.realDir, ".links"),
		filepath.Join(st, "profiles"),
		filepath.Join(st, "temproots"),
		filepath.Join(st, "db"),
	} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("store: creating %s: %w", d, err)
		}
	}
	gcroots := filepath.Join(st, "gcroots")
	if _, err := os.Lstat(gcroots); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(gcroots, 0o755); err != nil {
			return fmt.Errorf("store: creating %s: %w", gcroots, err)
		}
		if err := os.Symlink(filepath.Join(st, "profiles"), filepath.Join(gcroots, "profiles")); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("store: creating %s/profiles: %w", gcroots, err)
		}
	}
	user := "root"
	if uid := os.Getuid(); uid != 0 {
		user = strconv.Itoa(uid)
		if u := os.Getenv("USER"); u != "" {
			user = u
		}
	}
	if err := s.shareStoreDir(); err != nil {
		return err
	}
	for _, d := range []string{filepath.Join(st, "profiles", "per-user"), filepath.Join(gcroots, "per-user")} {
		if err := os.MkdirAll(filepath.Join(d, user), 0o755); err != nil {
			return fmt.Errorf("store: creating %s: %w", d, err)
		}
		if err := os.Chmod(d, 0o755); err != nil {
			return fmt.Errorf("store: chmod %s: %w", d, err)
		}
	}
	return nil
}

// cleanLeftovers removes what an earlier instance of this program left in
// the store directory when it died: temporary directories of content
// additions. Invalid store path directories are left for the garbage
// collector, or deleted when the path is added again, as Nix does.
func (s *Store) cleanLeftovers() {
	ents, err := os.ReadDir(s.realDir)
	if err != nil {
		s.log.Warn("cannot read store directory", "dir", s.realDir, "err", err)
		return
	}
	for _, e := range ents {
		pid, ok := tempDirPID(e.Name())
		if !ok || (pid != os.Getpid() && processAlive(pid)) {
			continue
		}
		p := filepath.Join(s.realDir, e.Name())
		s.log.Info("removing leftover temporary directory", "path", p)
		if err := removeAll(p); err != nil {
			s.log.Warn("cannot remove leftover temporary directory", "path", p, "err", err)
		}
	}
}

// tempDirSuffix marks the temporary directories of AddToStoreContent:
// "<random hash>-nixyard-tmp-<pid>". The name parses as a store path, so a
// real Nix garbage collector treats it like any path and spares it while its
// hash part is one of our temporary roots.
const tempDirSuffix = "-nixyard-tmp-"

func tempDirPID(name string) (int, bool) {
	if len(name) <= storepath.HashLen || !strings.HasPrefix(name[storepath.HashLen:], tempDirSuffix) {
		return 0, false
	}
	pid, err := strconv.Atoi(name[storepath.HashLen+len(tempDirSuffix):])
	return pid, err == nil
}

func processAlive(pid int) bool {
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}

// Close releases the store: it stops its own work (an automatic
// collection) and waits for it, then releases its temporary roots file,
// its database connections and the big lock. Sessions should be closed
// first.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.bg.stop()
		errs := []error{s.saveLastUses(), s.roots.close(), s.db.close(), s.fsSync.dir.Close()}
		if s.bigLock != nil {
			errs = append(errs, s.bigLock.Close())
		}
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}

// Dir returns the logical store directory.
func (s *Store) Dir() storepath.Dir { return s.dir }

// RealPath returns where p lives on this machine's file system.
func (s *Store) RealPath(p storepath.Path) string { return s.realDir + "/" + p.String() }

// abs returns the logical absolute path of p, as the database stores it.
func (s *Store) abs(p storepath.Path) string { return s.dir.Abs(p) }

// stateFile returns a path inside the state directory.
func (s *Store) stateFile(elem ...string) string {
	return filepath.Join(append([]string{s.cfg.StateDir}, elem...)...)
}

// defaultReservedSize is Nix's gc-reserved-space.
const defaultReservedSize = 8 << 20

// reservedPath is the file that holds space for the garbage collector.
func (s *Store) reservedPath() string { return filepath.Join(s.cfg.StateDir, "db", "reserved") }

// reserveSpace makes the reserved file its configured size, as Nix does
// when it opens a store: its blocks allocated, not a sparse file. Where
// that fails (a disk too full), the file is removed: the reserve is only
// worth having when it does not take the last free space.
func (s *Store) reserveSpace() {
	size := s.cfg.ReservedSize
	if size == 0 {
		size = defaultReservedSize
	}
	if size < 0 {
		return
	}
	path := s.reservedPath()
	var st unix.Stat_t
	if unix.Stat(path, &st) == nil && st.Size == size && st.Blocks*512 >= size {
		return
	}
	err := func() error {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		err = unix.Fallocate(int(f.Fd()), 0, 0, size)
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
			return err
		}
		// A file system without fallocate: written out, in pieces.
		chunk := make([]byte, min(size, 1<<20))
		for off := int64(0); off < size; off += int64(len(chunk)) {
			if _, err := f.WriteAt(chunk[:min(int64(len(chunk)), size-off)], off); err != nil {
				return err
			}
		}
		return nil
	}()
	if err != nil {
		os.Remove(path)
		s.log.Warn("cannot reserve space for the garbage collector", "path", path, "err", err)
	}
}
