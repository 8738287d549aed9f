package substitute

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// breaker is a per-upstream circuit breaker: after Threshold consecutive
// failed attempts the upstream is skipped until the cool-down has passed;
// then attempts are let through again and one more failure re-opens it.
// The owning upstream's mu guards it.
type breaker struct {
	failures  int
	openUntil time.Time
	last      error // the last failure
}

// ErrUpstreamUnavailable is wrapped by errors for an upstream skipped
// because its circuit breaker is open.
var ErrUpstreamUnavailable = errors.New("upstream temporarily disabled after repeated failures")

func (s *Substituter) allow(up *upstream) bool {
	up.mu.Lock()
	defer up.mu.Unlock()
	return up.breaker.failures < s.cfg.BreakerThreshold || !s.now().Before(up.breaker.openUntil)
}

// skipped returns why up is left out of lookups now: the refusal of a
// cache that is not one (in the same words as when it was first read), or
// an open breaker. Otherwise nil.
func (s *Substituter) skipped(up *upstream) error {
	up.mu.Lock()
	defer up.mu.Unlock()
	if up.inited && up.initErr != nil {
		return up.initErr
	}
	if up.breaker.failures < s.cfg.BreakerThreshold || !s.now().Before(up.breaker.openUntil) {
		return nil
	}
	return &skippedError{base: up.base, cooldown: s.cfg.BreakerCooldown, last: up.breaker.last}
}

// skippedError says why an upstream is skipped, in the same words for as
// long as it is, so that a client's warnings show it once (warnings are
// told once per connection by their text).
type skippedError struct {
	base     string
	cooldown time.Duration
	last     error
}

func (e *skippedError) Error() string {
	return fmt.Sprintf("binary cache '%s' is skipped for up to %v after repeated failures; the last: %v", e.base, e.cooldown, e.last)
}

func (e *skippedError) Unwrap() []error { return []error{ErrUpstreamUnavailable, e.last} }

// recordResult counts an attempt's result (err nil: success) against up's
// breaker.
func (s *Substituter) recordResult(up *upstream, err error) {
	up.mu.Lock()
	defer up.mu.Unlock()
	if err == nil {
		up.breaker = breaker{}
		return
	}
	up.breaker.last = err
	up.breaker.failures++
	if up.breaker.failures >= s.cfg.BreakerThreshold {
		wasOpen := s.now().Before(up.breaker.openUntil)
		up.breaker.openUntil = s.now().Add(s.cfg.BreakerCooldown)
		if !wasOpen {
			s.log.Warn("disabling upstream after repeated failures", "upstream", up.base,
				"failures", up.breaker.failures, "for", s.cfg.BreakerCooldown)
		}
	}
}

// retry runs op until it succeeds, fails for good, or MaxAttempts transient
// failures have happened, sleeping with exponential backoff and jitter (or
// the upstream's Retry-After, if not above MaxRetryAfter) in between. Every
// transient failure counts against the upstream's breaker; once the
// breaker is open retry gives up at once.
func (s *Substituter) retry(ctx context.Context, up *upstream, what string, op func(ctx context.Context) error) error {
	for attempt := 0; ; attempt++ {
		if !s.allow(up) {
			return fmt.Errorf("%s: %w", up.base, ErrUpstreamUnavailable)
		}
		err := op(ctx)
		if err == nil || errors.Is(err, errNotFound) {
			s.recordResult(up, nil)
			return err
		}
		if ctx.Err() != nil {
			return err
		}
		var te *transientError
		if !errors.As(err, &te) {
			return err
		}
		s.recordResult(up, err)
		if attempt+1 >= s.cfg.MaxAttempts {
			return fmt.Errorf("giving up after %d attempts: %w", attempt+1, err)
		}
		d := s.backoff(attempt)
		if te.retryAfter > 0 {
			if te.retryAfter > s.cfg.MaxRetryAfter {
				return fmt.Errorf("upstream asks to retry after %v, more than the cap %v: %w", te.retryAfter, s.cfg.MaxRetryAfter, err)
			}
			d = te.retryAfter
		}
		s.log.Info("retrying upstream request", "upstream", up.base, "what", what, "attempt", attempt+1, "in", d, "err", err)
		if err := s.cfg.Sleep(ctx, d); err != nil {
			return err
		}
	}
}

// backoff is BaseBackoff·2^attempt, capped at MaxBackoff, scaled by a
// random factor in [0.5, 1).
func (s *Substituter) backoff(attempt int) time.Duration {
	d := s.cfg.BaseBackoff
	for i := 0; i < attempt && d < s.cfg.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, s.cfg.MaxBackoff)
	s.randMu.Lock()
	f := 0.5 + s.cfg.Rand.Float64()/2
	s.randMu.Unlock()
	return time.Duration(float64(d) * f)
}

// sleepCtx is the default Config.Sleep.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
