package store

// The size budget (Config.SizeBudget): when the valid paths' NAR sizes sum
// to more than the budget, the automatic collection deletes dead paths
// until the sum of what it deleted brings the store to 90 % of it, least
// recently used first. A path is used when a client asks for its info or its NAR, or a session
// takes a temporary root on it (what clients do for every path they work
// with, and builds for their inputs); it was used when it was registered,
// at the latest. A path counts as used as recently as the most recently
// used path that refers to it, directly or not: a dependency of something
// a job used yesterday stays as long as that does.
//
// Last uses are kept in memory (to the second) and saved to
// <state>/nixyard-last-use at most once a minute, at the automatic
// collection's checks, and when the store is closed; after a crash the
// last minutes of uses are lost, and those paths count from their
// registration or an earlier use.

import (
	"bufio"
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// lastUses are the last uses of paths recorded since the store opened, or
// loaded from the last-use file.
type lastUses struct {
	m      sync.Map // storepath.Path -> int64, unix seconds
	dirty  atomic.Bool
	saveMu sync.Mutex
	saving atomic.Bool // a background save is under way (see AutoGC)
}

const lastUseFile = "nixyard-last-use"

// Touch records that paths are used now. It is cheap, and does nothing
// without a size budget.
func (s *Store) Touch(paths ...storepath.Path) {
	if s.cfg.SizeBudget == 0 {
		return
	}
	now := time.Now().Unix()
	for _, p := range paths {
		if v, ok := s.lastUse.m.Load(p); ok && v.(int64) >= now {
			continue
		}
		s.lastUse.m.Store(p, now)
		s.lastUse.dirty.Store(true)
	}
}

// loadLastUses reads the last-use file; a missing one is no error, and
// lines it cannot read are skipped.
func (s *Store) loadLastUses() error {
	f, err := os.Open(s.stateFile(lastUseFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		t, base, ok := strings.Cut(sc.Text(), " ")
		sec, err := strconv.ParseInt(t, 10, 64)
		if !ok || err != nil {
			continue
		}
		if p, err := storepath.ParseBase(base); err == nil {
			s.lastUse.m.Store(p, sec)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("store: reading %s: %w", f.Name(), err)
	}
	return nil
}

// saveLastUses writes the last uses, if any changed, to the last-use file
// (a new file renamed over the old one).
func (s *Store) saveLastUses() error {
	l := &s.lastUse
	l.saveMu.Lock()
	defer l.saveMu.Unlock()
	if !l.dirty.Swap(false) {
		return nil
	}
	name := s.stateFile(lastUseFile)
	f, err := os.CreateTemp(s.cfg.StateDir, lastUseFile+".tmp-")
	if err != nil {
		l.dirty.Store(true)
		return fmt.Errorf("store: saving last uses: %w", err)
	}
	w := bufio.NewWriter(f)
	l.m.Range(func(k, v any) bool {
		fmt.Fprintf(w, "%d %s\n", v.(int64), k.(storepath.Path).String())
		return true
	})
	err = w.Flush()
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), name)
	}
	if err != nil {
		os.Remove(f.Name())
		l.dirty.Store(true)
		return fmt.Errorf("store: saving last uses: %w", err)
	}
	return nil
}

// lruOrder sorts the store directory's entries for a size-budget
// collection: entries that are not valid paths first, then valid paths
// from the least recently used, where a path counts as used when any path
// that refers to it, directly or not, was. The links the collector
// follows besides references count as references: a derivation's
// outputs refer to it (keep-derivations, Nix's default), and with
// keep-outputs it refers to them. Last uses of paths that are not valid
// are forgotten.
func (s *Store) lruOrder(ctx context.Context, names []string) ([]string, error) {
	nodes, err := s.loadUseGraph(ctx)
	if err != nil {
		return nil, err
	}
	propagateLastUse(nodes)
	return sortByLastUse(names, nodes), nil
}

// useNode is a valid path in the graph of last uses.
type useNode struct {
	base      string
	own, eff  int64   // its own last use; the latest over it and its referrers
	referrers []int64 // ids of the paths that refer to it
	state     uint8   // 0 new, 1 visiting, 2 done
}

// loadUseGraph reads the valid paths (by database id) with their own last
// uses (at least their registration time) and referrers, counting the
// collector's links between derivations and outputs; it forgets the last
// uses of paths that are not valid.
func (s *Store) loadUseGraph(ctx context.Context) (map[int64]*useNode, error) {
	nodes := map[int64]*useNode{}
	ids := map[string]int64{}          // absolute path -> id
	derivers := map[int64]string{}     // id -> its deriver's absolute path
	valid := map[storepath.Path]bool{} // for forgetting the others' last uses
	rows, err := s.db.r.QueryContext(ctx, "select id, path, registrationTime, deriver from ValidPaths")
	if err != nil {
		return nil, fmt.Errorf("store: reading valid paths: %w", err)
	}
	for rows.Next() {
		var id, reg int64
		var abs string
		var deriver sql.NullString
		if err := rows.Scan(&id, &abs, &reg, &deriver); err != nil {
			rows.Close()
			return nil, fmt.Errorf("store: reading valid paths: %w", err)
		}
		n := &useNode{base: abs[strings.LastIndexByte(abs, '/')+1:], own: reg}
		if p, err := storepath.ParseBase(n.base); err == nil {
			valid[p] = true
			if v, ok := s.lastUse.m.Load(p); ok {
				n.own = max(n.own, v.(int64))
			}
		}
		nodes[id] = n
		ids[abs] = id
		if deriver.Valid && deriver.String != "" {
			derivers[id] = deriver.String
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: reading valid paths: %w", err)
	}
	s.lastUse.m.Range(func(k, _ any) bool {
		if !valid[k.(storepath.Path)] {
			s.lastUse.m.Delete(k)
			s.lastUse.dirty.Store(true)
		}
		return true
	})
	for out, drvAbs := range derivers {
		drv, ok := ids[drvAbs]
		if !ok || drv == out {
			continue
		}
		if !s.cfg.DiscardDerivations {
			nodes[drv].referrers = append(nodes[drv].referrers, out)
		}
		if s.cfg.KeepOutputs {
			nodes[out].referrers = append(nodes[out].referrers, drv)
		}
	}
	rows, err = s.db.r.QueryContext(ctx, "select referrer, reference from Refs")
	if err != nil {
		return nil, fmt.Errorf("store: reading references: %w", err)
	}
	for rows.Next() {
		var from, to int64
		if err := rows.Scan(&from, &to); err != nil {
			rows.Close()
			return nil, fmt.Errorf("store: reading references: %w", err)
		}
		if n := nodes[to]; n != nil && from != to && nodes[from] != nil {
			n.referrers = append(n.referrers, from)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: reading references: %w", err)
	}
	return nodes, nil
}

// propagateLastUse sets each node's eff to the latest own last use over
// it and everything that refers to it, directly or not.
func propagateLastUse(nodes map[int64]*useNode) {
	// A depth-first walk up the referrers, iterative since dependency
	// chains can be long.
	type frame struct {
		n *useNode
		i int
	}
	for _, root := range nodes {
		if root.state == 2 {
			continue
		}
		stack := []frame{{n: root}}
		root.state, root.eff = 1, root.own
		for len(stack) > 0 {
			top := &stack[len(stack)-1]
			if top.i < len(top.n.referrers) {
				r := nodes[top.n.referrers[top.i]]
				top.i++
				switch r.state {
				case 0:
					r.state, r.eff = 1, r.own
					stack = append(stack, frame{n: r})
				case 2:
					top.n.eff = max(top.n.eff, r.eff)
				}
				// state 1: a cycle, which a valid store does not have.
				continue
			}
			top.n.state = 2
			done := top.n
			stack = stack[:len(stack)-1]
			if len(stack) > 0 {
				parent := stack[len(stack)-1].n
				parent.eff = max(parent.eff, done.eff)
			}
		}
	}
	// A walk that met a cycle (a derivation and its outputs with
	// keep-outputs) left a node of it without the later times of the
	// others: spread times along the links until nothing changes, which
	// one pass does when there is no cycle.
	for pass, changed := 0, true; changed && pass < 64; pass++ {
		changed = false
		for _, n := range nodes {
			for _, r := range n.referrers {
				if t := nodes[r].eff; t > n.eff {
					n.eff, changed = t, true
				}
			}
		}
	}
}

// sortByLastUse orders the store directory's entries names: those that
// are not valid paths (not in nodes) first, then by the nodes' eff, then
// by name.
func sortByLastUse(names []string, nodes map[int64]*useNode) []string {
	eff := make(map[string]int64, len(nodes))
	for _, n := range nodes {
		eff[n.base] = n.eff
	}
	order := slices.Clone(names)
	key := func(name string) int64 {
		if t, ok := eff[name]; ok {
			return t
		}
		return -1 // not a valid path: junk, deleted first
	}
	slices.SortStableFunc(order, func(a, b string) int {
		if c := cmp.Compare(key(a), key(b)); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	return order
}
