package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"
)

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
func QueryPathInfoLoad(ctx context.Context, socket string, paths []string, conns int, warmup, duration time.Duration) (LoadResult, error) {
	res := LoadResult{Conns: conns}
	if len(paths) == 0 {
		return res, errors.New("no paths to query")
	}
	cs := make([]*Conn, 0, conns)
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
					p := paths[order[k%len(order)]]
					var r QueryResult
					if r, err = c.QueryPathInfo(p); err != nil {
						break
					}
					if !r.Valid {
						err = fmt.Errorf("daemon says %s is not valid", p)
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
	c, err := Dial(ctx, socket)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	var sum uint64
	for _, p := range paths {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		r, err := c.QueryPathInfo(p)
		if err != nil {
			return 0, err
		}
		if !r.Valid {
			return 0, fmt.Errorf("%s is not valid in the daemon's store", p)
		}
		sum += r.NarSize
	}
	return sum, nil
}
