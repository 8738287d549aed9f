package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nixyard/nixyard/internal/build"
	"github.com/nixyard/nixyard/internal/cache"
	"github.com/nixyard/nixyard/internal/config"
	"github.com/nixyard/nixyard/internal/daemon"
	"github.com/nixyard/nixyard/internal/jobs"
	"github.com/nixyard/nixyard/internal/metrics"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/realise"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/timerslack"
)

const version = "0.1.0"

const daemonUsage = `usage: nixyard daemon [options]

  --store DIR           serve a chroot store rooted at DIR (files under DIR/nix/store,
                        state under DIR/nix/var/nix, socket DIR/nix/var/nix/daemon-socket/socket)
  --stdio               serve one trusted client on stdin/stdout (what ssh-ng runs)
  --listen PATH[,trusted=false|users][,tenant=NAME][,max-connections=N]
                        also listen on PATH (absolute; repeatable), a CI job socket: every
                        client of it is untrusted whatever its uid (trusted=users:
                        trusted-users decides, as on the default socket); at most N
                        connections open (default 1024); NAME (default PATH) names its
                        clients in logs and metrics
  --metrics-listen ADDR serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9470)
  --cache-listen ADDR   serve the store as an HTTP binary cache at http://ADDR/ (narinfos
                        signed with secret-key-files), for substituters = http://ADDR
  --push-to URL         push every build's outputs, with their closures, to the binary cache
                        at URL (file:///DIR, an http(s) cache that takes PUT, or
                        s3://BUCKET?region=R&endpoint=HOST with AWS credentials found as
                        the AWS SDK finds them), signed with secret-key-files, from a
                        queue kept across restarts; Nix's parameters (?compression=xz,
                        write-nar-listing, secret-key, ...) apply
  --size-budget SIZE    keep the store's paths under SIZE of NAR (e.g. 200G; K, M, G, T are
                        powers of 1024), collecting the least recently used dead paths first
  --shutdown-grace D    on SIGTERM, SIGINT or SIGHUP, stop accepting connections and serve those
                        open for up to D (default 60s, 0 for none) so that their builds
                        and commands finish; a second signal stops at once
  --option NAME VALUE   override a nix.conf setting
  --log-level LEVEL     debug, info, warn or error (default info; error with --stdio, whose
                        standard error is the ssh-ng user's terminal)
  --version             print the Nix version nixyard speaks for, and its own

nix-daemon's other arguments are taken as it takes them: --daemon (ignored), -v/--verbose,
--quiet and --debug (the log level, unless --log-level is given), --log-format (ignored),
-j/--max-jobs, --cores, --max-silent-time, --timeout, -K, -k, and Nix's Boolean settings
as --NAME and --no-NAME (--sandbox, --no-sandbox, --relaxed-sandbox, ...).

Environment: NIX_STORE_DIR, NIX_STATE_DIR, NIX_LOG_DIR, NIX_CONF_DIR, NIX_DAEMON_SOCKET_PATH, NIX_CONFIG.
`

// daemonOptions are the parsed arguments of "nixyard daemon".
type daemonOptions struct {
	root      string
	stdio     bool
	overrides [][2]string
	logLevel  slog.Level
	levelSet  bool // --log-level was given
	listens   []daemon.ListenSpec
	metrics   string // --metrics-listen address, "" for none
	cache     string // --cache-listen address, "" for none
	pushTo    string // --push-to URL, "" for none
	budget    uint64 // --size-budget in bytes, 0 for none
	grace     time.Duration
}

// nixBoolSettings are Nix 2.8's Boolean settings that nix-daemon, like
// every Nix command, takes as flags: --NAME sets it, --no-NAME clears it.
var nixBoolSettings = []string{
	"accept-flake-config", "allow-dirty", "allow-import-from-derivation", "allow-new-privileges",
	"allow-symlinked-store", "allow-unsafe-native-code-during-evaluation", "auto-optimise-store",
	"builders-use-substitutes", "compress-build-log", "enforce-determinism", "eval-cache", "fallback",
	"filter-syscalls", "fsync-metadata", "keep-build-log", "keep-derivations", "keep-env-derivations",
	"keep-failed", "keep-going", "keep-outputs", "preallocate-contents", "print-missing", "pure-eval",
	"require-sigs", "restrict-eval", "run-diff-hook", "sandbox", "sandbox-fallback", "show-trace",
	"substitute", "sync-before-registering", "trace-function-calls", "use-case-hack", "use-registries",
	"use-sqlite-wal", "warn-dirty",
}

// nixValueFlags are the flags Nix's commands take for settings with a
// value (nix-daemon's among them), with the setting each sets.
var nixValueFlags = map[string]string{
	"-j": "max-jobs", "--max-jobs": "max-jobs", "--cores": "cores",
	"--max-silent-time": "max-silent-time", "--timeout": "timeout",
}

// expandShortFlags splits "-vvK" into "-v", "-v", "-K", as Nix's argument
// parser does.
func expandShortFlags(args []string) []string {
	var out []string
	for _, a := range args {
		if len(a) > 2 && a[0] == '-' && a[1] != '-' && ('a' <= a[1] && a[1] <= 'z' || 'A' <= a[1] && a[1] <= 'Z') {
			for _, c := range a[1:] {
				out = append(out, "-"+string(c))
			}
			continue
		}
		out = append(out, a)
	}
	return out
}

// defaultShutdownGrace is how long a stopping daemon serves the
// connections open, by default: less than systemd's default stop timeout
// (90 s), which would kill it without its clean-up.
const defaultShutdownGrace = 60 * time.Second

func parseDaemonArgs(args []string) (daemonOptions, error) {
	o := daemonOptions{grace: defaultShutdownGrace}
	args = expandShortFlags(args)
	verbosity := 0 // nix-daemon's -v, --quiet and --debug
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, val, hasVal := strings.Cut(a, "=")
		need := func() (string, error) {
			if hasVal {
				return val, nil
			}
			if i+1 >= len(args) {
				return "", fmt.Errorf("%s needs an argument", name)
			}
			i++
			return args[i], nil
		}
		var err error
		switch name {
		case "--store":
			o.root, err = need()
			if err == nil && (strings.Contains(o.root, "://") || strings.Contains(o.root, "?") || slices.Contains([]string{"auto", "daemon", "local"}, o.root)) {
				err = fmt.Errorf("--store %q: nixyard serves a local store; give a directory (a chroot store's root), not a store URL", o.root)
			}
		case "--stdio":
			o.stdio = true
		case "--listen":
			var v string
			if v, err = need(); err == nil {
				var spec daemon.ListenSpec
				spec, err = daemon.ParseListenSpec(v)
				o.listens = append(o.listens, spec)
			}
		case "--metrics-listen":
			o.metrics, err = need()
		case "--cache-listen":
			o.cache, err = need()
		case "--push-to":
			o.pushTo, err = need()
		case "--shutdown-grace":
			var v string
			if v, err = need(); err == nil {
				if o.grace, err = time.ParseDuration(v); err != nil || o.grace < 0 {
					err = fmt.Errorf("--shutdown-grace %q: want a duration such as 60s or 10m", v)
				}
			}
		case "--size-budget":
			var v string
			if v, err = need(); err == nil {
				if o.budget, err = config.ParseSize(v); err != nil {
					err = fmt.Errorf("--size-budget: %w", err)
				}
			}
		case "--daemon":
			// nix-daemon accepts and ignores it.
		case "--option":
			if i+2 >= len(args) {
				return o, fmt.Errorf("--option needs a name and a value")
			}
			o.overrides = append(o.overrides, [2]string{args[i+1], args[i+2]})
			i += 2
		case "--log-level":
			var v string
			if v, err = need(); err == nil {
				err = o.logLevel.UnmarshalText([]byte(v))
				o.levelSet = true
			}
		case "-h", "--help":
			fmt.Print(daemonUsage)
			return o, errHelp
		case "--version":
			fmt.Printf("nix-daemon (Nix) %s (nixyard %s)\n", daemon.NixVersion, version)
			return o, errHelp
		// nix-daemon's other arguments, which every Nix command takes.
		case "-v", "--verbose":
			verbosity++
		case "--quiet":
			verbosity--
		case "--debug":
			verbosity = 2
		case "--log-format":
			_, err = need() // nixyard's log is its own
		case "-Q", "--no-build-output", "--no-gc-warning":
		case "-K":
			o.overrides = append(o.overrides, [2]string{"keep-failed", "true"})
		case "-k":
			o.overrides = append(o.overrides, [2]string{"keep-going", "true"})
		case "--relaxed-sandbox":
			o.overrides = append(o.overrides, [2]string{"sandbox", "relaxed"})
		case "--readonly-mode":
			err = errors.New("--readonly-mode: a daemon that may not write the store is not implemented by nixyard")
		default:
			setting, ok := nixValueFlags[name]
			switch bare := strings.TrimPrefix(name, "--"); {
			case ok:
				var v string
				if v, err = need(); err == nil {
					o.overrides = append(o.overrides, [2]string{setting, v})
				}
			case strings.HasPrefix(name, "--") && slices.Contains(nixBoolSettings, bare) && !hasVal:
				o.overrides = append(o.overrides, [2]string{bare, "true"})
			case strings.HasPrefix(name, "--no-") && slices.Contains(nixBoolSettings, bare[3:]) && !hasVal:
				o.overrides = append(o.overrides, [2]string{bare[3:], "false"})
			default:
				return o, fmt.Errorf("unknown argument %q (see --help; a setting goes as --option NAME VALUE)", a)
			}
		}
		if err != nil {
			return o, err
		}
	}
	if !o.levelSet && verbosity != 0 {
		o.logLevel = min(max(slog.LevelInfo-slog.Level(4*verbosity), slog.LevelDebug), slog.LevelError)
		o.levelSet = true
	}
	if o.root != "" {
		abs, err := filepath.Abs(o.root)
		if err != nil {
			return o, fmt.Errorf("--store: %w", err)
		}
		o.root = abs
	}
	return o, nil
}

var errHelp = errors.New("help requested")

func runDaemon(ctx context.Context, stopNow <-chan struct{}, args []string) error {
	opts, err := parseDaemonArgs(args)
	if errors.Is(err, errHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	logger := newLogger(ctx, &opts)
	layout := config.NewLayout(opts.root, os.Getenv)
	settings, err := loadSettings(layout, opts.overrides, logger)
	if err != nil {
		return err
	}
	if opts.stdio && opts.root == "" {
		if forwarded, err := forwardStdio(ctx, settings, layout, logger); forwarded || err != nil {
			return err
		}
	}
	if !opts.stdio {
		if err := checkSocketsFree(layout.SocketPath, opts.listens, logger); err != nil {
			return err
		}
	}
	st, secretKeys, err := openStore(ctx, settings, layout, opts.budget, logger)
	if err != nil {
		return err
	}
	defer st.Close()

	if opts.stdio && (opts.metrics != "" || opts.cache != "" || opts.pushTo != "") {
		// One process per ssh-ng session: a second one could not listen,
		// and each would push the one queue.
		logger.Warn("--metrics-listen, --cache-listen and --push-to are ignored with --stdio")
		opts.metrics, opts.cache, opts.pushTo = "", "", ""
	}
	// Jobs come through sockets: a --stdio daemon (an ssh-ng session)
	// serves none, and leaves the socket daemon's job journals alone.
	var jm *jobs.Manager
	var predecessor <-chan struct{} // a daemon of this store still stopping
	if !opts.stdio {
		if jm, err = startJobs(ctx, st, settings, logger); err != nil {
			return err
		}
		defer jm.Close()
		predecessor = jm.Predecessor()
	}
	web, err := startHTTP(ctx, opts, st, secretKeys, predecessor, logger)
	if err != nil {
		return err
	}
	defer web.stop()

	subCfg, err := realise.ConfigFromSettings(settings, os.Getenv)
	if err != nil {
		return err
	}
	subCfg.Logger = logger
	buildCfg, err := build.ConfigFromSettings(settings, layout, logger)
	if err != nil {
		return err
	}
	if mets := web.metrics; mets != nil {
		if jm != nil {
			mets.Jobs(func() int { return len(jm.Live()) })
		}
		subCfg.OnFetched = mets.Fetched
		buildCfg.Metrics = mets
	}
	if opts.pushTo != "" {
		pusher, err := startPusher(ctx, opts.pushTo, st, layout, secretKeys, web.metrics, logger)
		if err != nil {
			return err
		}
		if jm != nil {
			// What the daemon before queued while this one started is
			// held by nothing once it has gone: held here before any
			// collection.
			jm.BeforeTakeOver(ctx, func(ctx context.Context) {
				if err := pusher.HoldQueue(ctx); err != nil {
					logger.Warn("cannot hold the push queue", "err", err)
				}
			})
		}
		defer pusher.Start(ctx, predecessor)() // stopped before the store closes
		buildCfg.OnBuilt = pusher.EnqueueBuilt
	}
	var hookListener net.Listener
	if !opts.stdio {
		var removeSocket func()
		hookListener, removeSocket = listenHook(layout, &buildCfg, logger)
		defer removeSocket()
	}
	builder, err := build.New(buildCfg, st)
	if err != nil {
		return err
	}
	defer builder.Close()
	web.metrics.BuildsWaiting(builder.Waiting)
	rm, err := realise.New(subCfg, st, daemon.RealiseBuilder(builder))
	if err != nil {
		return err
	}
	srv := daemon.New(daemon.Options{
		Store:           st,
		TrustedUsers:    settings.List("trusted-users", []string{"root"}),
		AllowedUsers:    settings.List("allowed-users", []string{"*"}),
		BuildUsersGroup: settings.String("build-users-group", ""),
		Settings:        settings.Map(),
		Realise:         rm,
		Builder:         builder,
		Jobs:            jm,
		Metrics:         web.metrics,
		Logger:          logger,
		ShutdownGrace:   opts.grace,
		StopNow:         stopNow,
		Busy:            web.cacheBusy,
	})
	if opts.stdio {
		return serveStdio(ctx, srv, builder, logger)
	}
	ls, err := listenAll(layout.SocketPath, opts.listens, logger)
	if err != nil {
		return err
	}
	if hookListener != nil {
		ls = append(ls, daemon.Listener{Listener: hookListener, Policy: daemon.ListenPolicy{Trusted: true}})
	}
	logger.Info("nixyard daemon listening", "socket", ls[0].Addr().String(), "store", layout.RealStoreDir, "version", version)
	err = srv.ServeAll(ctx, ls)
	web.stopCache()
	// Builds stopped with their connections clean up (sandbox, build
	// directory, locks) before the process ends.
	awaitBuilds(builder, logger)
	return err
}

// newLogger makes the daemon's logger at opts' level (errors only for
// --stdio unless --log-level says otherwise), and widens the timer slack.
func newLogger(ctx context.Context, opts *daemonOptions) *slog.Logger {
	if opts.stdio && !opts.levelSet {
		// ssh-ng shows the remote program's standard error to the user,
		// who gets what concerns them through the protocol: only errors
		// here, as nix-daemon --stdio writes nothing of its own.
		opts.logLevel = slog.LevelError
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: opts.logLevel, ReplaceAttr: hint.StripAttr}))
	if err := timerslack.Widen(timerslack.Daemon); err != nil {
		// Expected when not root; as root, a container may have dropped
		// CAP_SYS_NICE, which an operator should hear of.
		level := slog.LevelDebug
		if os.Geteuid() == 0 {
			level = slog.LevelInfo
		}
		logger.Log(ctx, level, "keeping the inherited timer slack", "err", err)
	}
	return logger
}

// loadSettings reads nix.conf (and NIX_CONFIG) with the --option
// overrides, and names the settings nixyard ignores.
func loadSettings(layout config.Layout, overrides [][2]string, logger *slog.Logger) (*config.Settings, error) {
	settings, err := config.Load(layout.ConfDir, os.Getenv)
	if err != nil {
		return nil, err
	}
	for _, kv := range overrides {
		settings.Set(kv[0], kv[1])
	}
	for _, name := range append(config.Unimplemented(settings), config.IgnoredTuning(settings)...) {
		logger.Warn("nix.conf setting not implemented by nixyard; ignored", "setting", name)
	}
	for _, name := range config.Unknown(settings) {
		logger.Warn("unknown setting; ignored (a typing mistake?)", "setting", name)
	}
	defaultBuildUsers(settings, logger)
	return settings, nil
}

// defaultBuildUsers gives build-users-group Nix's default when nix.conf
// does not set it: nixbld for a daemon running as root, whose builders
// then run as its members, not as root, whatever store it serves (the
// users are locked in the host's userpool, which every daemon on the host
// shares: config.Layout.UserPoolDir). Where that group does not exist,
// builds run as the daemon's user, as with build-users-group = (Nix would
// fail them), and the daemon says so; so where it has no members.
func defaultBuildUsers(settings *config.Settings, logger *slog.Logger) {
	if _, set := settings.Lookup("build-users-group"); set || os.Geteuid() != 0 {
		return
	}
	const group = "nixbld"
	if err := build.CheckBuildUsers(group); err != nil {
		logger.Warn("build-users-group is not set and its default group cannot serve: builders run as root", "group", group, "err", err)
		return
	}
	settings.Set("build-users-group", group)
}

// forwardStdio serves --stdio without --store as nix-daemon does: a user
// who cannot write the store is forwarded to the daemon, which decides
// their trust. It reports whether it forwarded (the session is over).
func forwardStdio(ctx context.Context, settings *config.Settings, layout config.Layout, logger *slog.Logger) (bool, error) {
	remote := os.Getenv("NIX_REMOTE")
	if remote == "" {
		remote = "auto"
	}
	sock, err := daemon.StdioForwardSocket(settings.String("store", remote), layout.StateDir, layout.SocketPath)
	if err != nil || sock == "" {
		return false, err
	}
	logger.Debug("forwarding stdio to the daemon", "socket", sock)
	return true, daemon.ForwardStdio(ctx, sock, os.Stdin, os.Stdout)
}

// httpServers are the daemon's HTTP servers: metrics (nil without
// --metrics-listen) and the binary cache.
type httpServers struct {
	metrics   *metrics.Metrics
	stopCache func()     // stops the binary cache (at once when the drain ends)
	cacheBusy func() int // NARs the cache is sending, or nil
	stop      func()     // stops both
}

// startHTTP starts --metrics-listen's and --cache-listen's servers.
func startHTTP(ctx context.Context, opts daemonOptions, st *store.Store, secretKeys []signature.SecretKey, predecessor <-chan struct{}, logger *slog.Logger) (*httpServers, error) {
	h := &httpServers{stopCache: func() {}}
	stopMetrics := func() {}
	h.stop = func() { h.stopCache(); stopMetrics() }
	if opts.metrics != "" {
		h.metrics = metrics.New(st.Stats)
		st.OnAutoGC(h.metrics.AutoGC)
		mux := http.NewServeMux()
		mux.Handle("/metrics", h.metrics.Handler())
		stop, err := serveHTTP(ctx, opts.metrics, mux, logger, "--metrics-listen", "/metrics", predecessor)
		if err != nil {
			return nil, err
		}
		stopMetrics = stop
	}
	if opts.cache != "" {
		if len(secretKeys) == 0 {
			logger.Warn("--cache-listen without secret-key-files: narinfos go unsigned (but for the signatures paths have), and clients that require signatures (Nix's default) refuse them")
		}
		srv := cache.New(st, cache.Config{SecretKeys: secretKeys, Logger: logger})
		stop, err := serveHTTP(ctx, opts.cache, srv, logger, "--cache-listen", "/", predecessor)
		if err != nil {
			h.stop()
			return nil, err
		}
		// Stopped as soon as the drain ends (NARs being sent count in
		// it), not after the builds' clean-up.
		h.stopCache, h.cacheBusy = stop, srv.Sending
	}
	return h, nil
}

// serveStdio serves the one client on standard input and output (an
// ssh-ng session), then lets its stopped builds clean up.
func serveStdio(ctx context.Context, srv *daemon.Server, builder *build.Builder, logger *slog.Logger) error {
	// A client gone while the daemon writes to it must not kill the
	// daemon with SIGPIPE (Go's default for standard output) before its
	// builds have cleaned up. Notify, not Ignore: an ignored signal would
	// stay ignored in the builders it starts.
	sigpipe := make(chan os.Signal, 1)
	signal.Notify(sigpipe, syscall.SIGPIPE)
	defer signal.Stop(sigpipe)
	err := srv.ServeConn(ctx, os.Stdin, os.Stdout, true)
	// A build its client left is being stopped: let it clean up (sandbox,
	// build directory) before the process ends.
	awaitBuilds(builder, logger)
	return err
}

// startPusher makes the pusher of --push-to TARGET (not started), counted
// in mets if not nil.
func startPusher(ctx context.Context, target string, st *store.Store, layout config.Layout, secretKeys []signature.SecretKey, mets *metrics.Metrics, logger *slog.Logger) (*cache.Pusher, error) {
	tgt, pushOpts, err := cache.OpenTarget(ctx, target, logger)
	if err != nil {
		return nil, fmt.Errorf("--push-to: %w", err)
	}
	pusher, err := cache.NewPusher(ctx, st, tgt, pushOpts, filepath.Join(layout.StateDir, "nixyard-push"), secretKeys, logger)
	if err != nil {
		return nil, err
	}
	if mets != nil {
		pusher.OnPushed = mets.Pushed
		mets.PushQueue(pusher.QueueLen)
	}
	if len(secretKeys) == 0 && len(pushOpts.Keys) == 0 {
		logger.Warn("--push-to without secret-key-files or secret-key=: what is pushed is not signed")
	}
	logger.Info("pushing built outputs", "to", tgt.String())
	return pusher, nil
}

// jobReapInterval is how often ended jobs are looked for between
// collections (each collection also looks first).
const jobReapInterval = time.Minute

// startJobs creates the job-session manager, with the settings of
// nix.conf that are the jobs' (see jobs.OptionsFromSettings), and its
// periodic reaper.
func startJobs(ctx context.Context, st *store.Store, settings *config.Settings, logger *slog.Logger) (*jobs.Manager, error) {
	opts, err := jobs.OptionsFromSettings(settings)
	if err != nil {
		return nil, err
	}
	opts.Logger = logger
	jm, err := jobs.New(ctx, st, opts)
	if err != nil {
		return nil, err
	}
	go jm.Run(ctx, jobReapInterval)
	return jm, nil
}

// listenHook opens the socket through which the build hook reaches the
// store and points buildCfg at it; without it (an error, logged), no
// builds go to remote builders, and the listener is nil. The returned
// function removes the socket.
func listenHook(layout config.Layout, buildCfg *build.Config, logger *slog.Logger) (net.Listener, func()) {
	l, path, err := daemon.ListenHookSocket(layout.StateDir)
	if err != nil {
		logger.Warn("no socket for the build hook: no builds are sent to remote builders", "err", err)
		return nil, func() {}
	}
	if layout.Root != "" {
		buildCfg.HookStore = "unix://" + path + "?root=" + url.QueryEscape(layout.Root)
	} else {
		// As nix-daemon's hook, which opens "local", the hook's messages
		// then name no store.
		buildCfg.HookStore, buildCfg.HookSocket = "daemon", path
	}
	return l, func() { os.Remove(path) }
}

// awaitBuilds waits up to 30 s for the builder's stopped builds to clean
// up.
func awaitBuilds(builder *build.Builder, logger *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := builder.Wait(ctx); err != nil {
		logger.Warn("builds still cleaning up at exit", "err", err)
	}
}

// openStore opens the store of layout with the settings of nix.conf it
// honours (require-sigs, keep-outputs, keep-derivations, min-free,
// max-free, gc-reserved-space, min-free-check-interval,
// auto-optimise-store, secret-key-files, trusted-public-keys) and the
// size budget, and returns it with the secret keys it signs with.
func openStore(ctx context.Context, settings *config.Settings, layout config.Layout, budget uint64, logger *slog.Logger) (*store.Store, []signature.SecretKey, error) {
	requireSigs, err := settings.Bool("require-sigs", true)
	if err != nil {
		return nil, nil, err
	}
	keepOutputs, err := settings.Bool("keep-outputs", false)
	if err != nil {
		return nil, nil, err
	}
	keepDerivations, err := settings.Bool("keep-derivations", true)
	if err != nil {
		return nil, nil, err
	}
	minFree, err := settings.NonNegInt("min-free", 0)
	if err != nil {
		return nil, nil, fmt.Errorf("nix.conf: %w", err)
	}
	maxFree := uint64(0) // no limit
	if v := settings.String("max-free", "-1"); v != "-1" {
		if maxFree, err = strconv.ParseUint(v, 10, 64); err != nil {
			return nil, nil, fmt.Errorf("nix.conf: max-free: not a number of bytes: %w", err)
		}
		if maxFree == 0 {
			minFree = 0 // nothing to free: no collection
		}
	}
	reserved, err := settings.Int("gc-reserved-space", 8<<20)
	if err != nil {
		return nil, nil, fmt.Errorf("nix.conf: %w", err)
	}
	if reserved == 0 {
		reserved = -1 // none
	}
	checkInterval, err := settings.NonNegInt("min-free-check-interval", 5)
	if err != nil {
		return nil, nil, fmt.Errorf("nix.conf: %w", err)
	}
	autoOptimise, err := settings.Bool("auto-optimise-store", false)
	if err != nil {
		return nil, nil, err
	}
	secretKeys, err := readSecretKeys(settings.List("secret-key-files", nil))
	if err != nil {
		return nil, nil, err
	}
	st, err := store.Open(ctx, store.Config{
		StoreDir:             layout.StoreDir,
		RealStoreDir:         layout.RealStoreDir,
		StateDir:             layout.StateDir,
		LogDir:               layout.LogDir,
		TrustedPublicKeys:    settings.List("trusted-public-keys", []string{"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="}),
		RequireSigs:          requireSigs,
		KeepOutputs:          keepOutputs,
		DiscardDerivations:   !keepDerivations,
		SecretKeys:           secretKeys,
		AutoOptimise:         autoOptimise,
		MinFree:              uint64(minFree),
		MaxFree:              maxFree,
		MinFreeCheckInterval: time.Duration(checkInterval) * time.Second,
		SizeBudget:           budget,
		ReservedSize:         reserved,
		BuildUsersGroup:      settings.String("build-users-group", ""),
		Logger:               logger,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("opening store %s: %w", layout.RealStoreDir, err)
	}
	if budget > 0 {
		logger.Info("size budget: an addition that finds the store's NAR bytes over it collects the least recently used dead paths", "budget", budget)
	}
	return st, secretKeys, nil
}

// readSecretKeys reads nix.conf secret-key-files: files each holding one
// "name:base64" secret key, with which the daemon signs what it builds.
func readSecretKeys(files []string) ([]signature.SecretKey, error) {
	var keys []signature.SecretKey
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("nix.conf: secret-key-files: %w", err)
		}
		k, err := signature.ParseSecretKey(strings.TrimSpace(string(data)))
		if err != nil {
			return nil, fmt.Errorf("nix.conf: secret-key-files: %s: %w", f, err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// serveHTTP serves h at addr until the returned stop is called; flag
// names the option in errors, path what the log names. An address in use
// while predecessor (if not nil) is open is taken to be the stopping
// daemon's: it is served once that daemon has let go.
func serveHTTP(ctx context.Context, addr string, h http.Handler, logger *slog.Logger, flag, path string, predecessor <-chan struct{}) (stop func(), err error) {
	l, err := net.Listen("tcp", addr)
	if err != nil && !(errors.Is(err, syscall.EADDRINUSE) && predecessor != nil) {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	// Served on while the daemon drains (ctx, done at the first signal,
	// would end every request at once: metrics are wanted then most).
	base := context.WithoutCancel(ctx)
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, BaseContext: func(net.Listener) context.Context { return base }}
	serve := func(l net.Listener) {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("HTTP server failed", "option", flag, "err", err)
		}
	}
	announce := func(l net.Listener) {
		logger.Info("serving over HTTP", "option", flag, "url", "http://"+l.Addr().String()+path)
	}
	if err == nil {
		announce(l)
		go serve(l)
	} else {
		logger.Info("the address is the stopping daemon's; serving it once that daemon has let go", "option", flag, "addr", addr)
		go func() {
			if l, err := listenAfter(ctx, addr, flag, predecessor, logger); err != nil {
				if ctx.Err() == nil {
					logger.Error("cannot serve over HTTP", "option", flag, "err", err)
				}
			} else {
				announce(l)
				serve(l)
			}
		}()
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			// Handlers get 5 s to end before the store closes; then they
			// are cut off (a NAR being sent breaks off, its temporary
			// root goes).
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if srv.Shutdown(sctx) != nil {
				srv.Close()
			}
		})
	}, nil
}

// listenAfter listens on addr once predecessor is closed, trying again
// while the address is in use (the daemon before lets its addresses go as
// it exits), until ctx ends; a while after the predecessor has gone it
// says that something else may hold the address.
func listenAfter(ctx context.Context, addr, flag string, predecessor <-chan struct{}, logger *slog.Logger) (net.Listener, error) {
	select {
	case <-predecessor:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	warnAt := time.Now().Add(10 * time.Second)
	for {
		l, err := net.Listen("tcp", addr)
		if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
			return l, err
		}
		if !warnAt.IsZero() && time.Now().After(warnAt) {
			logger.Warn("the address is still in use though the daemon before has gone (another program?); trying until it is free", "option", flag, "addr", addr)
			warnAt = time.Time{}
		}
		select {
		case <-time.After(200 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
