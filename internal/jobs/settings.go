package jobs

import (
	"fmt"
	"strconv"
	"time"

	"github.com/nixyard/nixyard/internal/config"
)

// OptionsFromSettings reads nixyard's job settings from nix.conf (or
// --option): job-lease, a Go duration such as 6h or a number of seconds,
// job-max-connections and job-namespace-depth. Unset, each keeps its
// default.
func OptionsFromSettings(settings *config.Settings) (Options, error) {
	opts := Options{Lease: DefaultLease}
	if v, ok := settings.Lookup("job-lease"); ok {
		d, err := parseLease(v)
		if err != nil {
			return Options{}, err
		}
		opts.Lease = d
	}
	if v, ok := settings.Lookup("job-max-connections"); ok {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return Options{}, fmt.Errorf("setting job-max-connections: %q is not a positive number", v)
		}
		opts.MaxConns = n
	}
	if v, ok := settings.Lookup("job-namespace-depth"); ok {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n > 32 {
			return Options{}, fmt.Errorf("setting job-namespace-depth: %q is not a number from 1 to 32", v)
		}
		opts.Depth = n
	}
	return opts, nil
}

func parseLease(v string) (time.Duration, error) {
	if d, err := time.ParseDuration(v); err == nil && d > 0 {
		return d, nil
	}
	var secs int64
	if _, err := fmt.Sscan(v, &secs); err == nil && secs > 0 && fmt.Sprint(secs) == v {
		return time.Duration(secs) * time.Second, nil
	}
	return 0, fmt.Errorf("setting job-lease: %q is not a positive duration (e.g. 6h) or number of seconds", v)
}
