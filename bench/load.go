package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/daemon/client"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// Dial connects to a daemon socket as the Nix 2.8.0 client does (protocol
// 1.34, SetOptions with its defaults), with internal/daemon/client.
func Dial(ctx context.Context, socket string) (*client.Client, error) {
	return client.Dial(ctx, socket)
}

// parsePaths parses absolute store paths.
func parsePaths(paths []string) ([]storepath.Path, error) {
	out := make([]storepath.Path, len(paths))
	for i, s := range paths {
		p, err := storepath.DefaultDir.Parse(s)
		if err != nil {
			return nil, err
		}
		out[i] = p
	}
	return out, nil
}

// queryValid asks QueryPathInfo for p; a path the daemon says is not valid
// is an error.
func queryValid(ctx context.Context, c *client.Client, p storepath.Path) (*store.PathInfo, error) {
	info, err := c.QueryPathInfo(ctx, p)
	if errors.Is(err, store.ErrNotValid) {
		return nil, fmt.Errorf("daemon says %s is not valid", storepath.DefaultDir.Abs(p))
	}
	return info, err
}

// LoadResult is the outcome of one QueryPathInfo load run.
type LoadResult struct {
	Conns    int
	Requests int64
	Elapsed  time.Duration
}

// PerSecond is the request rate.
func (r LoadResult) PerSecond() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Requests) / r.Elapsed.Seconds()
}

// QueryPathInfoLoad opens conns connections to socket, warms them up for
// warmup, then has each send QueryPathInfo requests back to back for
// duration, one request in flight per connection, cycling through paths in
// a per-connection random order. Every path must be valid: an invalid one
// means the store was not populated as expected and fails the run.
// Connection set-up is not timed.
//
// The load client shares the machine's cores with the daemon under test, so
// it is kept light: requests are encoded once, and each reply is checked
// (valid flag, every field present and within the protocol's limits, a
// 64-digit NAR hash) by skipping its fields rather than decoding them
// (client.QueryPathInfoValid). Both daemons are measured with this client.
func QueryPathInfoLoad(ctx context.Context, socket string, paths []string, conns int, warmup, duration time.Duration) (LoadResult, error) {
	res := LoadResult{Conns: conns}
	if len(paths) == 0 {
		return res, errors.New("no paths to query")
	}
	sps, err := parsePaths(paths)
	if err != nil {
		return res, err
	}
	cs := make([]*client.Client, 0, conns)
	defer func() {
		for _, c := range cs {
			c.Close()
		}
	}()
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for range conns {
		c, err := Dial(dctx, socket)
		if err != nil {
			return res, err
		}
		cs = append(cs, c)
	}
	reqs := make([][]byte, len(sps))
	for i, p := range sps {
		reqs[i] = cs[0].QueryPathInfoRequest(p)
	}

	run := func(d time.Duration) (int64, time.Duration, error) {
		var (
			wg    sync.WaitGroup
			mu    sync.Mutex
			total int64
			first error
		)
		start := time.Now()
		deadline := start.Add(d)
		for i, c := range cs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				order := rand.New(rand.NewPCG(uint64(i), uint64(conns))).Perm(len(paths))
				var n int64
				var err error
				for k := 0; ; k++ {
					if k%64 == 0 && (time.Now().After(deadline) || ctx.Err() != nil) {
						break
					}
					j := order[k%len(order)]
					if err = c.QueryPathInfoValid(reqs[j]); err != nil {
						if errors.Is(err, store.ErrNotValid) {
							err = fmt.Errorf("daemon says %s is not valid", paths[j])
						}
						break
					}
					n++
				}
				mu.Lock()
				total += n
				if err != nil && first == nil {
					first = err
				}
				mu.Unlock()
			}()
		}
		wg.Wait()
		elapsed := time.Since(start)
		if first == nil {
			first = ctx.Err()
		}
		return total, elapsed, first
	}
	if warmup > 0 {
		if _, _, err := run(warmup); err != nil {
			return res, fmt.Errorf("warm-up: %w", err)
		}
	}
	n, elapsed, err := run(duration)
	res.Requests, res.Elapsed = n, elapsed
	return res, err
}

// CheckValid queries every path once over one connection and returns the sum
// of their NAR sizes; it fails if any path is invalid.
func CheckValid(ctx context.Context, socket string, paths []string) (uint64, error) {
	sps, err := parsePaths(paths)
	if err != nil {
		return 0, err
	}
	c, err := Dial(ctx, socket)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	var sum uint64
	for _, p := range sps {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		info, err := queryValid(ctx, c, p)
		if err != nil {
			return 0, err
		}
		sum += info.NarSize
	}
	return sum, nil
}
