package store

import (
	"slices"
	"sync"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// infoCache keeps the PathInfo of recently queried paths in memory, so that
// a QueryPathInfo that hits it costs a map lookup and one cheap SQLite call
// instead of a query.
//
// Consistency: every lookup first reads the database's data_version on a
// dedicated connection (database.dataVersion). It changes whenever any
// other connection commits — our own writer (registration, AddSignatures,
// garbage collection, repair, verify, DerivationOutputs: every write of this
// package goes through it) as much as another process such as real Nix
// opening the same store. When it has changed since the cache was last
// checked, the whole cache is dropped before the lookup. An entry is only
// inserted if no commit was seen between the check that preceded its
// database read and the insertion (fill compares generations), so an entry
// is never older than the newest commit the cache has been checked against.
// A lookup that hits therefore answers exactly what a query would have
// answered at the moment of its check: there is no staleness window, and no
// write path needs to remember to invalidate. The price is that every commit
// empties the cache; reads refill it.
//
// Not-valid answers are not cached. Entries are never handed out: callers
// get copies (clone), so they may modify what they receive.
//
// An infoCache is safe for concurrent use.
type infoCache struct {
	db *database

	mu   sync.Mutex
	cond sync.Cond // on mu: a check finished
	gen  int64     // data_version the entries are valid for
	m    map[storepath.Path]*PathInfo

	started, finished uint64 // checks started and finished (one runs at a time)
	running           bool
	checkErr          error // of the last finished check
}

// maxCachedInfos bounds the cache: at a few hundred bytes per entry (paths,
// hash, a handful of references) this is tens of MB at most. Beyond it, an
// arbitrary entry is dropped for each new one.
const maxCachedInfos = 1 << 17

func (c *infoCache) init(db *database) {
	c.db = db
	c.cond.L = &c.mu
	c.gen = -1
	c.m = map[storepath.Path]*PathInfo{}
}

// check brings the cache up to date with the database and returns the
// generation a database read made from now on may be filled under.
//
// Concurrent callers share checks: a caller needs a check that started
// after it arrived (one already running may have read data_version before
// a commit that finished just before the caller came), so it waits for the
// running check to end and then for the next one, which one of the waiters
// runs for all of them. Called with c.mu held; c.mu is released while the
// pragma runs.
func (c *infoCache) check() (int64, error) {
	need := c.started + 1
	for c.finished < need {
		if c.running {
			c.cond.Wait()
			continue
		}
		c.running = true
		c.started++
		n := c.started
		c.mu.Unlock()
		c.db.guardMu.Lock()
		v, err := c.db.dataVersion()
		c.db.guardMu.Unlock()
		c.mu.Lock()
		c.running = false
		c.finished = n
		c.checkErr = err
		if err == nil && v != c.gen {
			clear(c.m)
			c.gen = v
		}
		c.cond.Broadcast()
	}
	if c.checkErr != nil {
		return 0, c.checkErr
	}
	return c.gen, nil
}

// get returns a copy of p's cached info (nil if absent) and the generation
// under which a database read started now may be filled in.
func (c *infoCache) get(p storepath.Path) (*PathInfo, int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	gen, err := c.check()
	if err != nil {
		return nil, 0, err
	}
	if e := c.m[p]; e != nil {
		return clone(e), gen, nil
	}
	return nil, gen, nil
}

// fill inserts info, read from the database after a get that returned gen.
// It keeps its own copy.
func (c *infoCache) fill(gen int64, info *PathInfo) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return // a commit was seen since: info may predate it
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
