package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// parseDBPath parses an absolute store path read from the database.
func (s *Store) parseDBPath(abs string) (storepath.Path, error) {
	p, err := s.dir.Parse(abs)
	if err != nil {
		return storepath.Path{}, fmt.Errorf("store: database row %q: %w", abs, err)
	}
	return p, nil
}

func (s *Store) scanPaths(rows *sql.Rows, what string) ([]storepath.Path, error) {
	defer rows.Close()
	var out []storepath.Path
	for rows.Next() {
		var abs string
		if err := rows.Scan(&abs); err != nil {
			return nil, fmt.Errorf("store: %s: %w", what, err)
		}
		p, err := s.parseDBPath(abs)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, err)
	}
	return storepath.Sort(out), nil
}

// pointCtx is the context of single-row queries by primary or unique key.
// They take microseconds, so they are not made cancellable: with a
// cancellable context database/sql and go-sqlite3 each start a goroutine
// per query, which costs more than the query.
func pointCtx(ctx context.Context) context.Context { return context.WithoutCancel(ctx) }

// IsValidPath reports whether p is registered as valid. The answer may come
// from the path info cache, which can be up to externalStaleness behind a
// commit by another process (cache.go); decisions that must not act on
// that, made under a path's lock or by the garbage collector, use
// IsValidPathFresh.
func (s *Store) IsValidPath(ctx context.Context, p storepath.Path) (bool, error) {
	info, err := s.lookup(ctx, p)
	return info != nil, err
}

// IsValidPathFresh is IsValidPath read from the database, never the cache:
// for the check made after taking a path's lock (another process may have
// registered the path while we waited for it) and for the garbage
// collector's decisions. A cache entry it contradicts is dropped.
func (s *Store) IsValidPathFresh(ctx context.Context, p storepath.Path) (bool, error) {
	var one int
	err := s.db.qValid.QueryRowContext(pointCtx(ctx), s.abs(p)).Scan(&one)
	valid := err == nil
	if errors.Is(err, sql.ErrNoRows) {
		err = nil
	}
	if err != nil {
		return false, fmt.Errorf("store: querying validity of %s: %w", s.abs(p), err)
	}
	s.cache.correct(p, valid)
	return valid, nil
}

// QueryPathInfo returns the metadata of a valid path, or an error wrapping
// ErrNotValid. The result is the caller's to modify. Answers come from the
// in-memory cache when it holds p (see cache.go for why that is current).
func (s *Store) QueryPathInfo(ctx context.Context, p storepath.Path) (*PathInfo, error) {
	info, err := s.QueryPathInfoShared(ctx, p)
	if err != nil {
		return nil, err
	}
	return clone(info), nil
}

// QueryPathInfoShared is QueryPathInfo for callers that only read the
// result: on a cache hit it returns the cached entry itself, without a copy.
// The caller must not modify it or anything it refers to (slices included).
func (s *Store) QueryPathInfoShared(ctx context.Context, p storepath.Path) (*PathInfo, error) {
	info, err := s.lookup(ctx, p)
	if err == nil && info == nil {
		err = fmt.Errorf("store: path '%s': %w", s.abs(p), ErrNotValid)
	}
	return info, err
}

// lookup returns p's info, shared as by QueryPathInfoShared, or nil if p
// is not valid: from the cache if it knows, else from the database (and
// then the cache knows).
func (s *Store) lookup(ctx context.Context, p storepath.Path) (*PathInfo, error) {
	info, known, epoch, err := s.cache.getShared(p)
	if err != nil {
		return nil, fmt.Errorf("store: querying path info of %s: %w", s.abs(p), err)
	}
	if known {
		return info, nil
	}
	info, err = s.queryPathInfoDB(ctx, p)
	if errors.Is(err, ErrNotValid) {
		info, err = nil, nil
	}
	if err != nil {
		return nil, err
	}
	s.cache.fill(epoch, p, info)
	return info, nil
}

// queryPathInfoDB reads p's metadata from the database.
func (s *Store) queryPathInfoDB(ctx context.Context, p storepath.Path) (*PathInfo, error) {
	abs := s.abs(p)
	var (
		h        string
		regTime  int64
		deriver  sql.NullString
		narSize  sql.NullInt64
		ultimate sql.NullInt64
		sigs     sql.NullString
		ca       sql.NullString
		refs     sql.NullString
	)
	err := s.db.qPathInfo.QueryRowContext(pointCtx(ctx), abs).Scan(&h, &regTime, &deriver, &narSize, &ultimate, &sigs, &ca, &refs)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("store: path '%s': %w", abs, ErrNotValid)
	}
	if err != nil {
		return nil, fmt.Errorf("store: querying path info of %s: %w", abs, err)
	}
	info := &PathInfo{
		Path:             p,
		RegistrationTime: time.Unix(regTime, 0),
		Ultimate:         ultimate.Valid && ultimate.Int64 != 0,
		CA:               ca.String,
	}
	if narSize.Valid && narSize.Int64 > 0 {
		info.NarSize = uint64(narSize.Int64)
	}
	if info.NarHash, err = hash.Parse(h); err != nil {
		return nil, fmt.Errorf("store: path %s: hash column: %w", abs, err)
	}
	if deriver.Valid && deriver.String != "" {
		if info.Deriver, err = s.parseDBPath(deriver.String); err != nil {
			return nil, fmt.Errorf("store: path %s: deriver column: %w", abs, err)
		}
	}
	if sigs.Valid && sigs.String != "" {
		info.Sigs = strings.Fields(sigs.String)
	}
	if refs.Valid && refs.String != "" {
		for _, r := range strings.Split(refs.String, " ") {
			p, err := s.parseDBPath(r)
			if err != nil {
				return nil, fmt.Errorf("store: references of %s: %w", abs, err)
			}
			info.References = append(info.References, p)
		}
		storepath.Sort(info.References)
	}
	return info, nil
}

// QueryReferrers returns the valid paths that refer to p (including p
// itself if it refers to itself).
func (s *Store) QueryReferrers(ctx context.Context, p storepath.Path) ([]storepath.Path, error) {
	rows, err := s.db.qReferrers.QueryContext(ctx, s.abs(p))
	if err != nil {
		return nil, fmt.Errorf("store: querying referrers of %s: %w", s.abs(p), err)
	}
	return s.scanPaths(rows, "referrers of "+s.abs(p))
}

// QueryAllValidPaths returns every valid path, sorted.
func (s *Store) QueryAllValidPaths(ctx context.Context) ([]storepath.Path, error) {
	rows, err := s.db.qAll.QueryContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("store: querying valid paths: %w", err)
	}
	return s.scanPaths(rows, "valid paths")
}

// QueryValidPaths returns the valid members of ps, sorted.
func (s *Store) QueryValidPaths(ctx context.Context, ps []storepath.Path) ([]storepath.Path, error) {
	var out []storepath.Path
	for _, p := range ps {
		ok, err := s.IsValidPath(ctx, p)
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, p)
		}
	}
	return storepath.Sort(out), nil
}

// QueryPathFromHashPart returns the valid path whose hash part is hashPart,
// or an error wrapping ErrNotValid.
func (s *Store) QueryPathFromHashPart(ctx context.Context, hashPart string) (storepath.Path, error) {
	if len(hashPart) != storepath.HashLen {
		return storepath.Path{}, fmt.Errorf("store: hash part %q: %w", hashPart, storepath.ErrBadPath)
	}
	prefix := string(s.dir) + "/" + hashPart
	var abs string
	err := s.db.qHashPart.QueryRowContext(pointCtx(ctx), prefix).Scan(&abs)
	if errors.Is(err, sql.ErrNoRows) || (err == nil && !strings.HasPrefix(abs, prefix+"-")) {
		return storepath.Path{}, fmt.Errorf("store: no path with hash part %s: %w", hashPart, ErrNotValid)
	}
	if err != nil {
		return storepath.Path{}, fmt.Errorf("store: querying hash part %s: %w", hashPart, err)
	}
	return s.parseDBPath(abs)
}

// QueryValidDerivers returns the valid derivations that list p as an output.
func (s *Store) QueryValidDerivers(ctx context.Context, p storepath.Path) ([]storepath.Path, error) {
	rows, err := s.db.qDerivers.QueryContext(ctx, s.abs(p))
	if err != nil {
		return nil, fmt.Errorf("store: querying derivers of %s: %w", s.abs(p), err)
	}
	return s.scanPaths(rows, "derivers of "+s.abs(p))
}

// QueryDerivationOutputMap returns the outputs of a valid derivation as
// registered in DerivationOutputs, or an error wrapping ErrNotValid.
func (s *Store) QueryDerivationOutputMap(ctx context.Context, drv storepath.Path) (map[string]storepath.Path, error) {
	abs := s.abs(drv)
	rows, err := s.db.qDrvOutputs.QueryContext(ctx, abs)
	if err != nil {
		return nil, fmt.Errorf("store: querying outputs of %s: %w", abs, err)
	}
	defer rows.Close()
	out := map[string]storepath.Path{}
	for rows.Next() {
		var name, path string
		if err := rows.Scan(&name, &path); err != nil {
			return nil, fmt.Errorf("store: outputs of %s: %w", abs, err)
		}
		p, err := s.parseDBPath(path)
		if err != nil {
			return nil, err
		}
		out[name] = p
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: outputs of %s: %w", abs, err)
	}
	if len(out) == 0 {
		if ok, err := s.IsValidPath(ctx, drv); err != nil {
			return nil, err
		} else if !ok {
			return nil, fmt.Errorf("store: path '%s': %w", abs, ErrNotValid)
		}
	}
	return out, nil
}

// QueryClosure returns the closure of ps under references, sorted. Every
// path in ps must be valid.
func (s *Store) QueryClosure(ctx context.Context, ps []storepath.Path) ([]storepath.Path, error) {
	seen := map[storepath.Path]bool{}
	todo := append([]storepath.Path(nil), ps...)
	for len(todo) > 0 {
		p := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if seen[p] {
			continue
		}
		seen[p] = true
		info, err := s.QueryPathInfo(ctx, p)
		if err != nil {
			return nil, err
		}
		for _, r := range info.References {
			if !seen[r] {
				todo = append(todo, r)
			}
		}
	}
	out := make([]storepath.Path, 0, len(seen))
	for p := range seen {
		out = append(out, p)
	}
	return storepath.Sort(out), nil
}

// Stats returns the number of valid paths and the sum of their NAR sizes.
func (s *Store) Stats(ctx context.Context) (paths, narBytes uint64, err error) {
	var n, size sql.NullInt64
	if err := s.db.r.QueryRowContext(ctx, "select count(*), sum(narSize) from ValidPaths").Scan(&n, &size); err != nil {
		return 0, 0, fmt.Errorf("store: counting valid paths: %w", err)
	}
	return uint64(n.Int64), uint64(size.Int64), nil
}
