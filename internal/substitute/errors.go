package substitute

// The errors of a substitution, as callers tell them apart: a path no
// cache has (ErrNotFound), has but unsigned (ErrUntrusted), whose NAR is
// gone (Gone), or whose failed download the client was shown (Shown).

import (
	"errors"
	"fmt"

	"github.com/nixyard/nixyard/internal/nix/hint"
)

// ErrNotFound is wrapped by errors for a path that no upstream has.
var ErrNotFound = errors.New("path not available from any substituter")

// ErrUntrusted is wrapped (with ErrNotFound) when upstreams have the path
// but none with a signature by a trusted key.
var ErrUntrusted = errors.New("not signed by any of the keys in 'trusted-public-keys'")

// untrustedError says, in Nix's words, that upstream has path but no
// trusted key signed its narinfo. It is ErrUntrusted and ErrNotFound: the
// path is not there for us, and the client is warned why.
type untrustedError struct{ path, upstream string }

func (e *untrustedError) Error() string {
	return fmt.Sprintf("the substitute for '%s' from '%s' is %v", e.path, e.upstream, ErrUntrusted)
}

func (e *untrustedError) Is(target error) bool {
	return target == ErrUntrusted || target == ErrNotFound
}

// missingNARError says, in Nix's words, that the NAR a narinfo points at
// is not in its cache, naming the NAR by its URL (relative to the cache,
// as the narinfo gives it). It is errNotFound.
type missingNARError struct{ url, upstream string }

func (e *missingNARError) Error() string {
	return hint.Fmt("file '%s' does not exist in binary cache '%s'", e.url, e.upstream)
}

func (e *missingNARError) Unwrap() error { return errNotFound }

// shownError is a download that failed, which the callers were told of
// with the end of its Substitute activity (see Shown).
type shownError struct{ err error }

func (e *shownError) Error() string { return e.err.Error() }
func (e *shownError) Unwrap() error { return e.err }

// Gone reports whether err, from a substitution, is only of paths whose
// narinfo a cache has but whose NAR it no longer has (Nix's
// SubstituteGone): as with Nix, that is as if no cache had them, and a
// derivation whose outputs they are is built, with no need for
// --fallback. A failure of any other kind among them makes it false.
func Gone(err error) bool {
	return allFailures(err, func(e error) bool { _, ok := e.(*missingNARError); return ok })
}

// Shown reports whether err, from a substitution, is only of downloads
// whose failure the caller was told of as it happened (the end of their
// Substitute activity): a request's error need not repeat them.
func Shown(err error) bool {
	return allFailures(err, func(e error) bool { _, ok := e.(*shownError); return ok })
}

// allFailures reports whether every failure err joins, looked at through
// its wrappers, is one that is() accepts; false for nil.
func allFailures(err error, is func(error) bool) bool {
	if err != nil && is(err) {
		return true
	}
	switch e := err.(type) {
	case interface{ Unwrap() []error }:
		errs := e.Unwrap()
		for _, x := range errs {
			if !allFailures(x, is) {
				return false
			}
		}
		return len(errs) > 0
	case interface{ Unwrap() error }:
		return allFailures(e.Unwrap(), is)
	}
	return false
}

// saidError is err told in other words (Nix's), which are its message.
type saidError struct {
	msg string
	err error
}

func (e *saidError) Error() string { return e.msg }
func (e *saidError) Unwrap() error { return e.err }
