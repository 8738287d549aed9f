package daemon

import (
	"cmp"
	"context"
	"strconv"
	"time"

	"github.com/nixyard/nixyard/internal/build"
	"github.com/nixyard/nixyard/internal/config"
	"github.com/nixyard/nixyard/internal/realise"
	"github.com/nixyard/nixyard/internal/store"
)

// RealiseBuilder plugs b into realise as its Builder. The options and the
// progress sink of the client a build is for travel in the request's
// context (withBuildRequest), since one Builder serves every connection;
// without them a build gets the daemon's settings and no progress.
func RealiseBuilder(b *build.Builder) realise.Builder { return realiseBuilder{b} }

type realiseBuilder struct{ b *build.Builder }

type buildRequestKey struct{}

// buildRequest is what one client's request passes to the Builder.
type buildRequest struct {
	opts build.ClientOptions
	prog build.Progress
}

func withBuildRequest(ctx context.Context, opts build.ClientOptions, prog build.Progress) context.Context {
	return context.WithValue(ctx, buildRequestKey{}, buildRequest{opts: opts, prog: prog})
}

// Build implements realise.Builder.
func (rb realiseBuilder) Build(ctx context.Context, targets []store.DerivedPath, opts realise.BuildOptions) ([]realise.Result, error) {
	req, _ := ctx.Value(buildRequestKey{}).(buildRequest)
	req.opts.Session = opts.Session
	req.opts.Substituter = opts.Substituter
	if opts.Repair {
		req.opts.Mode = build.ModeRepair
	}
	res, err := rb.b.Build(ctx, targets, req.opts, req.prog)
	if err != nil {
		return nil, err
	}
	out := make([]realise.Result, len(res))
	for i, r := range res {
		out[i] = realise.Result{Target: r.Path, Status: realise.Status(r.Status), ErrorMsg: r.ErrorMsg, Outputs: r.BuiltOutputs, Stopped: r.Stopped,
			TimesBuilt: r.TimesBuilt, StartTime: r.StartTime, StopTime: r.StopTime, NonDeterministic: r.NonDeterministic}
	}
	return out, nil
}

// buildOptions maps the client's settings (SetOptions) to the Builder's.
//
// max-jobs: the daemon's max-jobs caps the builds of all clients together
// (build.Config.MaxJobs). The client's value travels in a field of its
// own, never among the overrides, so an explicit setting cannot be told
// from Nix's default of 1, which every client sends when it has none:
// taken literally, 1 would serialise every client's builds on a host whose
// daemon allows more. So 1 sets no cap of the client's own; more than 1
// (which only a setting sends) can only lower the client's share; and 0
// (nix-build -j0) means what it means to Nix without remote builders:
// substitute, build nothing.
//
// max-silent-time, timeout, keep-failed and fallback
// apply as sent; zero means the daemon's own setting. cores (which every
// client sends, its own or the machine's count) can only lower the
// daemon's, as max-jobs does; a trusted client's max-build-log-size
// replaces the daemon's.
func (c *conn) buildOptions(mode uint64) build.ClientOptions {
	s := c.settings
	o := build.ClientOptions{
		MaxSilentTime: time.Duration(s.MaxSilentTime) * time.Second,
		KeepFailed:    s.KeepFailed,
		TryFallback:   s.TryFallback,
		KeepGoing:     s.KeepGoing,
		Mode:          build.BuildMode(mode),
		Session:       c.session,
		Settings:      s.Overrides,
	}
	if c.peer.job != nil {
		// A job's requests share out the build slots with other jobs as
		// one: one that runs many nix-builds at once does not take the
		// slots from the others.
		o.SlotShare = c.peer.job.ID()
	}
	switch {
	case s.MaxBuildJobs == 0:
		o.NoLocalBuilds = true
	case s.MaxBuildJobs > 1:
		o.MaxJobs = int(min(s.MaxBuildJobs, 1<<20))
	}
	// The overrides a client sent, as numbers (ok false if absent or not
	// a number below 2^bits).
	number := func(name string, bits int) (uint64, bool) {
		v, ok := s.Overrides[name]
		if !ok {
			return 0, false
		}
		n, err := strconv.ParseUint(v, 10, bits)
		return n, err == nil
	}
	if n, ok := number("timeout", 32); ok {
		o.Timeout = time.Duration(n) * time.Second
	}
	if n, ok := number("max-silent-time", 32); ok && o.MaxSilentTime == 0 {
		o.MaxSilentTime = time.Duration(n) * time.Second
	}
	o.Cores = int(min(s.BuildCores, 1<<16))
	// For these, 0 (none) must replace the daemon's: -1 says it.
	if n, ok := number("log-lines", 16); ok { // trusted clients only
		o.LogLines = cmp.Or(int(n), -1)
	}
	if n, ok := number("repeat", 16); ok {
		o.Repeat = cmp.Or(int(n), -1)
	}
	if n, ok := number("max-build-log-size", 63); ok { // trusted clients only
		o.MaxLogSize = cmp.Or(int64(n), -1) // 0: no limit
	}
	if v, ok := s.Overrides["enforce-determinism"]; ok { // trusted clients only
		if e, err := config.ParseBool(v); err == nil {
			o.EnforceDeterminism = &e
		}
	}
	return o
}
