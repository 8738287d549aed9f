package store

import (
	"slices"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// externalStaleness bounds how long a commit by another process (real Nix
// opening the same store directly) can go unnoticed by the path info cache.
// The stock nix-daemon caches path info per connection with no bound at all;
// checking SQLite's data_version costs a few microseconds, so checking at
// most this often keeps it off the per-request cost.
const externalStaleness = 10 * time.Millisecond

// infoCache keeps what recent lookups found out about paths in memory: the
// PathInfo of a valid path, or that a path is not valid. A QueryPathInfo or
// IsValidPath that hits it costs a map lookup instead of a query.
//
// Consistency:
//   - Our own writes: every transaction of this package goes through
//     database.write, which names the paths whose rows it may change and
//     calls invalidate with them after the commit. Their entries are
//     dropped, so a query that starts after a write returned never sees
//     what the write replaced. Registering new paths, which a busy daemon
//     does all the time, leaves the entries of all other paths alone.
//   - Other processes: the database's data_version, read on a dedicated
//     connection, changes whenever another connection commits. It is checked
//     when the last check is older than externalStaleness; when it changed,
//     the cache is dropped.
//   - Fills: an entry read from the database is inserted only if the cache's
//     epoch (bumped on every commit of ours and every drop) did not change
//     since the lookup that missed, so a read that raced with a commit is
//     never cached.
//
// Entries are handed out read-only (Store.QueryPathInfoShared);
// Store.QueryPathInfo gives callers a copy (clone) that they may modify.
//
// An infoCache is safe for concurrent use.
type infoCache struct {
	db  *database
	now func() time.Time

	mu        sync.RWMutex                 // read-locked by hits within externalStaleness
	epoch     uint64                       // bumped on every commit of ours and every drop
	version   int64                        // data_version at the last check (-1: none yet)
	checkedAt time.Time                    // when the last check started
	m         map[storepath.Path]*PathInfo // nil: known not to be valid
}

// maxCachedInfos bounds the cache: at a few hundred bytes per entry (paths,
// hash, a handful of references) this is tens of MB at most. Beyond it, an
// arbitrary entry is dropped for each new one.
const maxCachedInfos = 1 << 17

func (c *infoCache) init(db *database) {
	c.db = db
	c.now = time.Now
	c.version = -1
	c.m = map[storepath.Path]*PathInfo{}
	db.onCommit = c.committed
}

// committed drops the entries of the paths a commit of ours may have
// changed, or all of them if another process committed too;
// database.write calls it after each commit. The guard's data_version
// after the commit becomes the one the next check compares with: our own
// commit is not news.
func (c *infoCache) committed(cm commit) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cm.external {
		c.drop()
	} else {
		c.epoch++
		for _, p := range cm.touched {
			delete(c.m, p)
		}
	}
	c.version = cm.guardVersion
}

// correct drops the cache if p's entry contradicts valid, what a read of
// the database just found: another process has committed, and other
// entries may be stale too. Dropping can only make the cache fresher,
// whichever of the two readings is newer.
func (c *infoCache) correct(p storepath.Path, valid bool) {
	c.mu.RLock()
	info, known := c.m[p]
	c.mu.RUnlock()
	if !known || (info != nil) == valid {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.drop()
}

func (c *infoCache) drop() {
	clear(c.m)
	c.epoch++
}

// checkExternal drops the cache if another process committed since the last
// check. Called with c.mu held.
func (c *infoCache) checkExternal() error {
	now := c.now()
	if c.version >= 0 && now.Sub(c.checkedAt) < externalStaleness {
		return nil
	}
	c.db.guardMu.Lock()
	v, err := c.db.dataVersion()
	c.db.guardMu.Unlock()
	if err != nil {
		return err
	}
	c.checkedAt = now
	if v != c.version {
		c.drop()
		c.version = v
	}
	return nil
}

// getShared returns what the cache knows of p: its info, or nil if p is
// known not to be valid (known false: the cache does not know), and the
// epoch under which a database read started now may be filled in. The info
// is the entry itself, which nobody may modify (entries are never changed
// once inserted, only dropped). The common case, a check of data_version
// made less than externalStaleness ago, takes the lock shared, so
// concurrent connections do not queue.
func (c *infoCache) getShared(p storepath.Path) (info *PathInfo, known bool, epoch uint64, err error) {
	now := c.now()
	c.mu.RLock()
	if c.version >= 0 && now.Sub(c.checkedAt) < externalStaleness {
		info, known = c.m[p]
		epoch = c.epoch
		c.mu.RUnlock()
		return info, known, epoch, nil
	}
	c.mu.RUnlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.checkExternal(); err != nil {
		return nil, false, 0, err
	}
	info, known = c.m[p]
	return info, known, c.epoch, nil
}

// fill records what a database read that started after a getShared that
// returned epoch found out about p: its info (of which it keeps its own
// copy), or nil if p is not valid.
func (c *infoCache) fill(epoch uint64, p storepath.Path, info *PathInfo) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if epoch != c.epoch {
		return // a commit came in between: info may predate it
	}
	if len(c.m) >= maxCachedInfos {
		for k := range c.m {
			delete(c.m, k)
			break
		}
	}
	if info != nil {
		info = clone(info)
	}
	c.m[p] = info
}

// clone copies info and its slices.
func clone(info *PathInfo) *PathInfo {
	out := *info
	out.References = slices.Clone(info.References)
	out.Sigs = slices.Clone(info.Sigs)
	return &out
}
