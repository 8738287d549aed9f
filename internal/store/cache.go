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

// infoCache keeps the PathInfo of recently queried paths in memory, so that
// a QueryPathInfo that hits it costs a map lookup instead of a query.
//
// Consistency:
//   - Our own writes: every transaction of this package goes through
//     database.write, which calls invalidate after the commit. A query that
//     starts after a write returned never sees what the write replaced.
//   - Other processes: the database's data_version, read on a dedicated
//     connection, changes whenever another connection commits. It is checked
//     when the last check is older than externalStaleness; when it changed,
//     the cache is dropped.
//   - Fills: an entry read from the database is inserted only if the cache's
//     epoch (bumped on every drop) did not change since the lookup that
//     missed, so a read that raced with a commit is never cached.
//
// Not-valid answers are not cached. Entries are handed out read-only
// (Store.QueryPathInfoShared); Store.QueryPathInfo gives callers a copy
// (clone) that they may modify.
//
// An infoCache is safe for concurrent use.
type infoCache struct {
	db  *database
	now func() time.Time

	mu        sync.RWMutex // read-locked by hits within externalStaleness
	epoch     uint64       // bumped whenever the entries are dropped
	version   int64        // data_version at the last check (-1: none yet)
	checkedAt time.Time    // when the last check started
	m         map[storepath.Path]*PathInfo
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
	db.onCommit = c.invalidate
}

// invalidate drops every entry; database.write calls it after our commits.
func (c *infoCache) invalidate() {
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

// getShared returns p's cached info (nil if absent) and the epoch under
// which a database read started now may be filled in. It is the entry
// itself, which nobody may modify (entries are never changed once
// inserted, only dropped). The
// common case, a check of data_version made less than externalStaleness
// ago, takes the lock shared, so concurrent connections do not queue.
func (c *infoCache) getShared(p storepath.Path) (*PathInfo, uint64, error) {
	now := c.now()
	c.mu.RLock()
	if c.version >= 0 && now.Sub(c.checkedAt) < externalStaleness {
		e, epoch := c.m[p], c.epoch
		c.mu.RUnlock()
		return e, epoch, nil
	}
	c.mu.RUnlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.checkExternal(); err != nil {
		return nil, 0, err
	}
	return c.m[p], c.epoch, nil
}

// fill inserts info, read from the database after a get that returned
// epoch. It keeps its own copy.
func (c *infoCache) fill(epoch uint64, info *PathInfo) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if epoch != c.epoch {
		return // the cache was dropped since: info may predate a commit
	}
	if len(c.m) >= maxCachedInfos {
		for k := range c.m {
			delete(c.m, k)
			break
		}
	}
	c.m[info.Path] = clone(info)
}

// clone copies info and its slices.
func clone(info *PathInfo) *PathInfo {
	out := *info
	out.References = slices.Clone(info.References)
	out.Sigs = slices.Clone(info.Sigs)
	return &out
}
