// Package substitute fetches store paths from Nix binary caches
// (http://, https:// and file:// upstreams) into the local store.
//
// A Substituter reads each upstream's nix-cache-info (its StoreDir must
// match, its Priority orders the upstreams, lower first), looks paths up by
// <hashpart>.narinfo (404 and 403 mean "not there"), checks narinfo
// signatures against trusted-public-keys before downloading anything
// (content-addressed paths whose CA matches the path may be unsigned, as in
// Nix), and streams the NAR download through the decompressor (none, xz,
// zstd, bzip2, br) straight into Store.AddToStoreNar, which hashes and
// unpacks as it reads and registers only if NarHash and NarSize match.
// Nothing is copied to a temporary file and memory use does not grow with
// the NAR size.
//
// Transient failures (connection errors, resets, 5xx, 408, 429 with
// Retry-After up to a cap, truncated bodies, stalls) are retried with
// exponential backoff and jitter; a failed NAR transfer restarts from the
// beginning (the store discards partial work). An upstream whose attempts
// keep failing is skipped for a while (a circuit breaker) and the next
// upstream by priority is used. A hash or size mismatch is never
// registered and is reported with the upstream's URL.
//
// Narinfo lookups are cached in memory, positive and negative answers with
// their own TTLs, shared by all callers of one Substituter. Concurrent
// requests for the same path cause exactly one download (single flight);
// the others wait, see its progress and get its result. Realise computes
// the closure of the wanted paths from the narinfos' References, skips
// valid paths, and fetches the rest in parallel, at most Config.MaxJobs at
// once for each share of callers (a client, a CI job: WithShare) and twice
// as many across all, registering references before referrers.
//
// Time, sleeping, randomness and logging are injected through Config so
// tests control them.
package substitute
