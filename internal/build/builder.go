// Package build realises derivations in the local store as Nix 2.8's
// derivation goals do: a requested output that is valid is taken as is,
// or substituted from the caller's binary caches; otherwise the
// derivation's inputs are realised first (recursively, in parallel: input
// derivations are built or substituted, plain input paths substituted),
// then the derivation may be offered to Nix's build hook, which builds it
// on a remote machine (nix.conf builders); if the hook declines, its
// builder runs here (in a Linux namespace sandbox, or not) with the
// environment Nix gives builders, and its outputs are checked,
// canonicalised, scanned for references and registered. A "builtin:"
// builder (fetchurl, buildenv, unpack-channel) runs inside the daemon
// instead.
//
// One Builder serves the whole host: each derivation is built at most once
// however many callers ask for it at the same time (single flight), and at
// most Config.MaxJobs builders run at once across all callers, free slots
// going round-robin to the callers that wait for one, so a caller with many
// builds cannot starve one with few.
//
// The sandbox re-executes the running binary (/proc/self/exe) as a small
// helper that makes the namespaces, sets up the sandbox and then execs the
// builder; a binary using this package gets that helper from this package,
// as a C constructor (helper.c) that runs before the Go runtime and
// package initialisation and takes over only when argv[0] is the helper's
// marker. Since the helper makes the namespaces, the daemon starts it
// with a cheap vfork.
//
// The files:
//
//   - builder.go: Builder, its Config, the caller-facing types and Build.
//   - goal.go: goals (one per derivation and mode, shared by the callers
//     waiting for it), realising the inputs; waiters.go: whom a goal tells
//     of its build (its callers, and those of the goals that need it), and
//     their build counters.
//   - rounds.go: repeated builds (nix.conf repeat), their rounds compared.
//   - run.go: a job, one run of a builder here: laid out, executed,
//     logged, its outputs checked and registered.
//   - remote.go: remote builds through the build hook (build-remote).
//   - builtin.go, builtin_fetchurl.go, builtin_buildenv.go,
//     builtin_unpack.go: the builtin builders.
//   - sandbox.go: the sandbox's layout; helper.go and helper.c: the helper
//     that sets it up and execs the builder.
//   - slots.go: the build slots (max-jobs), shared round-robin by callers.
//   - users.go: the build users (build-users-group).
//   - hook.go: the pre-build, post-build and diff hooks.
//   - procgroup.go: a builder's or build hook's process group (killing it)
//     and the files made to start one.
//   - substitute.go: substituting outputs and input paths.
//   - basic.go: BuildBasic, a derivation a client sends whole.
//   - attrs.go: what a derivation's attributes ask of its build: output
//     placeholders, structured attributes, exportReferencesGraph and the
//     output checks (allowedReferences and the like).
//   - settings.go: the Config that nix.conf's build settings give.
package build

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// Status is the outcome of a build request, numbered as BuildResult's
// status on the wire.
type Status int

// The statuses of Nix 2.8's BuildResult.
const (
	Built                  Status = 0
	Substituted            Status = 1
	AlreadyValid           Status = 2
	PermanentFailure       Status = 3
	InputRejected          Status = 4
	OutputRejected         Status = 5
	TransientFailure       Status = 6
	CachedFailure          Status = 7
	TimedOut               Status = 8
	MiscFailure            Status = 9
	DependencyFailed       Status = 10
	LogLimitExceeded       Status = 11
	NotDeterministic       Status = 12
	ResolvesToAlreadyValid Status = 13
	NoSubstituters         Status = 14
)

// Success reports whether s means the outputs are valid.
func (s Status) Success() bool {
	return s == Built || s == Substituted || s == AlreadyValid || s == ResolvesToAlreadyValid
}

// Sandbox modes (nix.conf sandbox).
const (
	SandboxOff     = "false"
	SandboxOn      = "true"
	SandboxRelaxed = "relaxed" // fixed-output and __noChroot derivations build without it
)

// Config is the host-wide configuration of a Builder.
type Config struct {
	// MaxJobs caps the builders running at once across all callers
	// (nix.conf max-jobs); <= 0 means 1.
	MaxJobs int
	// NoLocalBuilds is nix.conf max-jobs = 0: outputs may be substituted
	// but nothing is built here; a request that needs a build fails with
	// ErrNoLocalBuilds, as with Nix when it has no remote builders.
	NoLocalBuilds bool
	// Cores is NIX_BUILD_CORES for builders; 0 means the number of CPUs,
	// as Nix does.
	Cores int
	// Sandbox is "true", "false" or "relaxed" (nix.conf sandbox).
	Sandbox string
	// SandboxBuildDir is the build directory inside the sandbox
	// (sandbox-build-dir, default /build); SandboxShmSize the size of the
	// sandbox's /dev/shm (sandbox-dev-shm-size, default 50%).
	SandboxBuildDir, SandboxShmSize string
	// SandboxPaths are extra paths visible in the sandbox, each "path",
	// "target=source", and either with a "?" suffix when optional.
	SandboxPaths []string
	// AllowedImpureHostDeps are the host paths (and the paths under them)
	// that a derivation's __impureHostDeps may bring into its sandbox
	// (allowed-impure-host-deps).
	AllowedImpureHostDeps []string
	// BuildUsersGroup, if set, is the group whose members run builders,
	// one build per user (Nix's build-users-group); "" runs builders as
	// the daemon's own user.
	BuildUsersGroup string
	// UserPoolDir is where the build users are locked (Nix's userpool, in
	// the host's state directory: config.Layout.UserPoolDir); "" means the
	// store's own state directory's userpool.
	UserPoolDir string
	// ChrootStore is set when the store's real directory differs from its
	// logical one (--store ROOT): builds are then always sandboxed so
	// builders see the real store at the logical store path.
	ChrootStore bool
	// BuildDir holds the temporary build directories; "" means os.TempDir().
	BuildDir string
	// MaxSilentTime and Timeout are the defaults for callers that set none
	// (nix.conf max-silent-time, timeout); 0 means none.
	MaxSilentTime, Timeout time.Duration
	// KeepFailed keeps the build directory of failed builds.
	KeepFailed bool
	// MaxLogSize kills a builder that writes more than that many bytes of
	// log (nix.conf max-build-log-size); 0 means no limit.
	MaxLogSize int64
	// NoBuildLogs keeps no build logs (nix.conf keep-build-log = false).
	NoBuildLogs bool
	// LogLines is how many last log lines a failure message shows (nix.conf
	// log-lines); 0 means 10, < 0 none.
	LogLines int
	// Logger receives the builder's own diagnostics; nil discards them.
	Logger *slog.Logger
	// System is the platform builders run on (nix.conf system, e.g.
	// "x86_64-linux"); ExtraPlatforms are others they can run
	// (extra-platforms). A derivation for another platform is refused,
	// unless its builder is builtin.
	System         string
	ExtraPlatforms []string
	// SystemFeatures are what the host offers the derivations that
	// require features (nix.conf system-features), sorted.
	SystemFeatures []string
	// SandboxFallback builds without the sandbox where the kernel refuses
	// its namespaces (nix.conf sandbox-fallback, Nix's default true);
	// a chroot store cannot.
	SandboxFallback bool
	// NoSyscallFilter turns off the seccomp filter that keeps builders
	// from making setuid or setgid files and extended attributes (nix.conf
	// filter-syscalls = false); AllowNewPrivileges lets builders gain
	// privileges through setuid programs (nix.conf allow-new-privileges).
	NoSyscallFilter, AllowNewPrivileges bool
	// PreBuildHook is a program run before each sandboxed build, which
	// may add paths to the sandbox (nix.conf pre-build-hook); "" means
	// none.
	PreBuildHook string
	// DiffHook, with RunDiffHook, is a program run when a check
	// (--check) finds an output that differs: as the build user, with the
	// output's path, the kept new output (<path>.check), the derivation
	// and the build directory as arguments (nix.conf diff-hook and
	// run-diff-hook).
	DiffHook    string
	RunDiffHook bool
	// Repeat builds each derivation that many more times, and compares
	// the outputs of each round with the previous one's (nix.conf repeat;
	// fixed-output derivations and builtin builders are built once). With
	// EnforceDeterminism off (nix.conf enforce-determinism = false), a
	// difference is reported and the round's outputs registered; on, the
	// build fails and nothing is registered.
	Repeat               int
	NoEnforceDeterminism bool
	// PostBuildHook is a program run after every successful build with
	// the outputs' paths (nix.conf post-build-hook); "" means none.
	PostBuildHook string
	// NixConfig is the daemon's configuration as nix.conf text, handed to
	// the post-build hook in NIX_CONFIG.
	NixConfig string
	// HashedMirrors are asked first for builtin:fetchurl's flat fixed
	// outputs, by hash (nix.conf hashed-mirrors).
	HashedMirrors []string
	// NetrcFile holds logins for builtin:fetchurl's downloads (nix.conf
	// netrc-file); "" means none.
	NetrcFile string
	// Builders are the remote machines (nix.conf builders: machine lines,
	// or "@FILE" for a file of them); BuildHook is the program that sends
	// builds to them (nix.conf build-hook; "" runs the nix on PATH as
	// Nix's build-remote). HookSettings are the daemon's settings, which
	// the hook gets as Nix hands it its own. See remote.go.
	Builders     string
	BuildHook    string
	HookSettings map[string]string
	// HookStore is the store URI through which the build hook reaches
	// this daemon (its socket); "" means no remote builds (a daemon
	// serving one client on stdio has no socket).
	HookStore string
	// HookSocket, if set, is the socket behind HookStore "daemon": the hook
	// gets it as NIX_DAEMON_SOCKET_PATH. (Nix's messages name no store for
	// "daemon", as for nix-daemon's own local store.)
	HookSocket string
	// Metrics, if set, is told when builds start and end.
	Metrics Metrics
	// OnBuilt, if set, gets the outputs of every build that made them
	// valid here (built here or on a remote machine): to push them to a
	// fleet cache, say. It must not block long.
	OnBuilt func(ctx context.Context, outputs []storepath.Path)
}

// Metrics receives the Builder's events for monitoring.
type Metrics interface {
	// BuildStarted: a builder starts, here or (remote) on another machine.
	BuildStarted(remote bool)
	// BuildEnded: it ended after d, with result "ok" (its outputs
	// registered), "failed" or "cancelled" (no caller waited any more).
	BuildEnded(remote bool, result string, d time.Duration)
}

// Substituter is the hook through which a caller's binary caches are
// asked for outputs before building. It must be safe for concurrent use.
type Substituter interface {
	// Substitute makes paths and the paths they need valid from the
	// caches. ok is false, and nothing is fetched, when the caches do not
	// have all of that (a build, then, as Nix decides); err with ok is a
	// download that failed.
	Substitute(ctx context.Context, paths []storepath.Path) (ok bool, err error)
	// Incomplete reports whether the caches have paths but not all of
	// their closures (then the goal looks again once its inputs are
	// built, as Nix's retrySubstitution).
	Incomplete(ctx context.Context, paths []storepath.Path) bool
}

// BuildMode is Nix's build mode (0 Normal, 1 Repair, 2 Check).
type BuildMode int

// The build modes, as numbered on the wire.
const (
	ModeNormal BuildMode = 0
	ModeRepair BuildMode = 1
	ModeCheck  BuildMode = 2
)

// ClientOptions are one caller's settings (from SetOptions). Zero values
// mean "no caller-specific limit": the Builder's Config applies.
type ClientOptions struct {
	// MaxJobs caps how many builds of this caller run at once; it can
	// only lower the caller's share of Config.MaxJobs. <= 0: no own cap.
	MaxJobs int
	// SlotShare names whom the caller's builds count with when build
	// slots are shared out: callers of one share (the requests of a CI
	// job: its id) get slots as one caller would. "": its own.
	SlotShare string
	// MaxSilentTime and Timeout override Config's when > 0.
	MaxSilentTime, Timeout time.Duration
	// NoLocalBuilds: the caller set max-jobs to 0 (nix-build -j0), so
	// that its request substitutes what it needs and builds nothing; one
	// that needs a build fails with ErrNoLocalBuilds. A build that another
	// caller also waits for, and may run, is built for that caller.
	NoLocalBuilds bool
	// KeepFailed keeps failed build directories (or Config.KeepFailed).
	KeepFailed bool
	// TryFallback builds from source when substitution fails.
	TryFallback bool
	// KeepGoing builds what it can when a build fails. Without it (Nix's
	// default) the first failure stops the caller's other builds that no
	// other caller waits for: the request's other targets, and the other
	// inputs of a derivation whose input failed.
	KeepGoing bool
	// Substituter, if not nil, is asked for the wanted outputs of each
	// input derivation before it is built, as Nix substitutes what it can
	// before it builds, for plain input paths that are not valid, for the
	// outputs of a derivation sent whole (BuildBasic), and in check mode
	// for all outputs of the requested derivations. The requested
	// derivations' outputs are the caller's to look up first (the
	// realiser does). nil: everything missing is built.
	Substituter Substituter
	// Mode: ModeNormal; ModeCheck (sandboxed builds only) builds the
	// requested derivations again and compares the outputs with the valid
	// ones; ModeRepair (sandboxed builds only) builds them again and
	// replaces those of their outputs that are missing or damaged
	// (nix-store --repair of an output that no cache has, as Nix does).
	Mode BuildMode
	// Session, if not nil, gets a temporary root on every output a
	// request returns.
	Session *store.Session
	// Settings are the caller's accepted setting overrides (SetOptions),
	// which the build hook gets on top of the daemon's: builders, say.
	Settings map[string]string
	// Cores is the caller's NIX_BUILD_CORES (its cores setting, which
	// every client sends); it can only lower the daemon's Config.Cores,
	// which shares the host between callers. 0: the daemon's.
	Cores int
	// MaxLogSize, if not 0, replaces Config.MaxLogSize (a trusted
	// caller's max-build-log-size); < 0 means no limit.
	MaxLogSize int64
	// LogLines, if not 0, replaces Config.LogLines (a trusted caller's
	// log-lines); < 0 means none.
	LogLines int
	// Repeat, if not 0, replaces Config.Repeat (the caller's repeat,
	// which any client may send); < 0 means 0.
	Repeat int
	// EnforceDeterminism, if not nil, replaces Config's (a trusted
	// caller's enforce-determinism).
	EnforceDeterminism *bool
}

// Round is which build of a derivation a builder runs, of how many
// (repeat + 1, Nix's rounds); {1, 1} for a derivation built once.
type Round struct{ N, Of int }

// Progress receives the events of builds a caller waits for; the daemon
// turns them into logger activities (§3.2 of worker-protocol.md). Methods
// may be called from several goroutines at once and must not block long.
type Progress interface {
	// BuildStarted: the builder of drv starts, in mode ("building
	// '<drv>'", "checking outputs of '<drv>'" or "repairing outputs of
	// '<drv>'"), here (machine "") or on a remote machine, for round
	// ("building '<drv>' (round 2/3)" when it is built several times).
	BuildStarted(drv, machine string, mode BuildMode, round Round)
	// BuildLogLine is one line of the builder's output, without "\n".
	BuildLogLine(drv, line string)
	// BuildPhase is a phase the builder announced with
	// `@nix {"action":"setPhase","phase":…}`.
	BuildPhase(drv, phase string)
	// BuildFinished: the build of drv ended (err nil on success), told
	// once its goal has ended and the counters count it, or when a round
	// of a repeated build that another round follows has ended.
	BuildFinished(drv string, err error)
	// GoalFailed: drv could not be realised, as r says (its builder
	// failed, it cannot be built here, an input failed, ...); not sent
	// for a goal stopped because another failed. As Nix, the client logs
	// it at once unless drv is one it asked for (whose failure is the
	// request's).
	GoalFailed(drv string, r Result)
	// BuildsProgress counts this caller's builds: done, expected,
	// running, failed (Nix's actBuilds progress).
	BuildsProgress(done, expected, running, failed int)
	// PostBuildHookStarted: the post-build hook runs after drv's build
	// ("running post-build-hook '<hook>'"); PostBuildHookLine is a line
	// of its output; PostBuildHookFinished: it ended.
	PostBuildHookStarted(drv, hook string)
	PostBuildHookLine(drv, line string)
	PostBuildHookFinished(drv string)
	// Error is a message for the caller at error level, outside any
	// build's log (Nix's printError): the diff hook's output, say.
	Error(msg string)
	// Info is a message for the caller at info level, outside any
	// build's log: an automatic collection this caller's build starts.
	Info(msg string)
	// Chatty is a message for the caller at chatty level (-vv): what Nix
	// says of a builder it starts.
	Chatty(msg string)
	// RemoteActivity is an activity event of the build hook that sends
	// drv to a remote machine: copying its inputs and outputs, the
	// remote build and its log (as nix-daemon forwards them).
	RemoteActivity(drv string, ev RemoteEvent)
}

// RemoteEvent is an activity event of the build hook, from Nix's JSON
// log: Action "start" (with Level, Type, Text and Fields), "stop", or
// "result" (with Type and Fields). ID is the hook's own activity id.
type RemoteEvent struct {
	Action string
	ID     uint64
	Level  int
	Type   int
	Text   string
	Fields []any // string or uint64
}

// Result is the outcome of one request, with what BuildResult carries.
type Result struct {
	Path     store.DerivedPath
	Status   Status
	ErrorMsg string // "" on success
	// Stopped: the request failed only because another of the caller's
	// builds failed first (KeepGoing off), not by a failure of its own.
	Stopped bool
	// noLocalBuilds: a build was needed, and no caller waiting for it
	// may build here (see ErrNoLocalBuilds).
	noLocalBuilds bool
	// HashMismatch: a fixed output's hash was not the one declared.
	HashMismatch bool
	TimesBuilt   int
	// NonDeterministic: rounds of a repeated build gave different outputs.
	NonDeterministic bool
	StartTime        time.Time // zero if nothing ran
	StopTime         time.Time
	BuiltOutputs     map[string]storepath.Path // output name -> path, for derivation requests
}

// Err returns the failure as an error, or nil on success.
func (r Result) Err() error {
	if r.Status.Success() {
		return nil
	}
	return &Error{Status: r.Status, Msg: r.ErrorMsg}
}

// Error is a failed build request.
type Error struct {
	Status Status
	Msg    string
}

func (e *Error) Error() string { return e.Msg }

// DefaultSystem is the platform of this binary in Nix's terms (nix.conf
// system's default), e.g. "x86_64-linux".
func DefaultSystem() string {
	arch := map[string]string{"amd64": "x86_64", "386": "i686", "arm64": "aarch64", "arm": "armv7l"}[runtime.GOARCH]
	if arch == "" {
		arch = runtime.GOARCH
	}
	return arch + "-" + runtime.GOOS
}

// DefaultExtraPlatforms is nix.conf extra-platforms' default for system,
// as Nix 2.8 computes it: x86_64 Linux runs i686 binaries, and the
// x86-64 microarchitecture levels this CPU has ("x86_64-v3-linux", …).
func DefaultExtraPlatforms(system string) []string {
	if system != "x86_64-linux" {
		return nil
	}
	extra := []string{"i686-linux"}
	for _, l := range x86Levels(cpuFlags()) {
		extra = append(extra, l+"-linux")
	}
	return extra
}

// x86Levels are the x86-64 microarchitecture levels (v1 to v4) whose CPU
// features flags (as /proc/cpuinfo names them) all has.
func x86Levels(flags map[string]bool) []string {
	levels := [][]string{
		{"cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2"},
		{"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2"},
		{"avx", "avx2", "f16c", "fma", "abm", "movbe"},
		{"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
	}
	var out []string
	for i, need := range levels {
		for _, f := range need {
			if !flags[f] {
				return out
			}
		}
		out = append(out, fmt.Sprintf("x86_64-v%d", i+1))
	}
	return out
}

// cpuFlags are the CPU's feature flags from /proc/cpuinfo (none if it
// cannot be read).
func cpuFlags() map[string]bool {
	flags := map[string]bool{}
	data, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return flags
	}
	for _, line := range strings.Split(string(data), "\n") {
		if name, value, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(name) == "flags" {
			for _, f := range strings.Fields(value) {
				flags[f] = true
			}
			break
		}
	}
	return flags
}

// DefaultSystemFeatures is nix.conf system-features' default: the
// features Nix 2.8 assumes, and kvm when /dev/kvm can be opened.
func DefaultSystemFeatures() []string {
	f := []string{"benchmark", "big-parallel", "nixos-test"}
	if unix.Access("/dev/kvm", unix.R_OK|unix.W_OK) == nil {
		f = append(f, "kvm")
	}
	return f
}

// canBuild reports, as Nix 2.8's canBuildLocally, whether this host can
// build drv: its platform is System or one of ExtraPlatforms (any, for a
// builtin builder), and it requires only SystemFeatures. The error is
// the start of Nix's message: "a 'PLATFORM' with features {…} is
// required", its values highlighted.
func (b *Builder) canBuild(drv *derivation.Derivation, required []string) error {
	required = slices.Clone(required)
	slices.Sort(required)
	required = slices.Compact(required)
	ok := drv.Platform == b.cfg.System || slices.Contains(b.cfg.ExtraPlatforms, drv.Platform) || isBuiltin(drv.Builder)
	for _, f := range required {
		ok = ok && slices.Contains(b.cfg.SystemFeatures, f)
	}
	if ok {
		return nil
	}
	return errors.New(hint.Fmt("a '%s' with features {%s} is required", drv.Platform, strings.Join(required, ", ")))
}

// Builder builds derivations for every caller of one store. It is safe
// for concurrent use.
type Builder struct {
	cfg   Config
	st    *store.Store
	log   *slog.Logger
	slots *slots
	users *userPool // nil without build users

	mu    sync.Mutex
	goals map[goalKey]*goal
	calls atomic.Uint64 // numbers the requests (call.id)
	// waitGen changes whenever a goal's callers or dependents change:
	// goals' cached waiters are good while it has not (see waiters).
	waitGen atomic.Uint64
	// running counts the goals under way, each until it has cleaned up
	// (see Wait).
	running sync.WaitGroup

	chrootMu sync.Mutex
	chroots  map[string]chan struct{} // sandbox roots in use, closed when free

	probeOnce  sync.Once // see namespaceSupport
	namespaces namespaceSupport

	hooks hookPool // build hooks (remote.go), under mu
}

// New returns a Builder for st.
func New(cfg Config, st *store.Store) (*Builder, error) {
	if cfg.MaxJobs <= 0 {
		cfg.MaxJobs = 1
	}
	if cfg.Cores <= 0 {
		cfg.Cores = runtime.NumCPU()
	}
	if cfg.LogLines == 0 {
		cfg.LogLines = 10
	}
	if cfg.System == "" {
		cfg.System = DefaultSystem()
	}
	cfg.SystemFeatures = slices.Compact(slices.Sorted(slices.Values(cfg.SystemFeatures)))
	if cfg.SandboxBuildDir == "" {
		cfg.SandboxBuildDir = sandboxBuildDir
	}
	if d := cfg.SandboxBuildDir; !filepath.IsAbs(d) || filepath.Clean(d) != d || d == "/" {
		return nil, fmt.Errorf("build: sandbox-build-dir: %q is not a clean absolute path below /", d)
	}
	if cfg.SandboxShmSize == "" {
		cfg.SandboxShmSize = "50%"
	}
	if strings.ContainsAny(cfg.SandboxShmSize, ", \t\n") {
		return nil, fmt.Errorf("build: sandbox-dev-shm-size: %q is not a size", cfg.SandboxShmSize)
	}
	switch cfg.Sandbox {
	case "":
		cfg.Sandbox = SandboxOn
	case SandboxOn, SandboxOff, SandboxRelaxed:
	default:
		return nil, fmt.Errorf("build: sandbox: invalid value %q (want true, false or relaxed)", cfg.Sandbox)
	}
	if cfg.BuildDir == "" {
		cfg.BuildDir = os.TempDir()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	for _, p := range cfg.SandboxPaths {
		if _, err := parseSandboxPath(p); err != nil {
			return nil, fmt.Errorf("build: sandbox-paths: %w", err)
		}
	}
	b := &Builder{
		cfg:   cfg,
		st:    st,
		log:   cfg.Logger,
		slots: newSlots(cfg.MaxJobs),
		goals: map[goalKey]*goal{},
		hooks: hookPool{wake: make(chan struct{}), offers: make(chan struct{}, maxOffers)},
	}
	if cfg.BuildUsersGroup != "" {
		var err error
		dir := cfg.UserPoolDir
		if dir == "" {
			dir = filepath.Join(st.StateDir(), "userpool")
		}
		if b.users, err = newUserPool(cfg.BuildUsersGroup, dir); err != nil {
			return nil, fmt.Errorf("build: build-users-group: %w", err)
		}
	}
	return b, nil
}

// sandboxed reports whether builds run in the sandbox.
func (b *Builder) sandboxed() bool {
	return b.cfg.ChrootStore || b.cfg.Sandbox != SandboxOff
}

// useSandbox decides, as Nix 2.8 does, whether drv builds in the sandbox:
// with sandbox = true always, and a derivation that asks not to be
// (__noChroot) is refused; with relaxed, unless it is a fixed-output
// derivation or asks not to be. A chroot store always sandboxes.
func (b *Builder) useSandbox(drvPath storepath.Path, drv *derivation.Derivation, attrs *derivation.Attrs) (bool, error) {
	noChroot, err := attrs.Bool("__noChroot", false)
	if err != nil {
		return false, err
	}
	use := false
	switch b.cfg.Sandbox {
	case SandboxOn:
		if noChroot {
			return false, errors.New(hint.Fmt("derivation '%s' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'", b.abs(drvPath)))
		}
		use = true
	case SandboxRelaxed:
		kind, _ := drv.Kind()
		use = kind != derivation.FixedOutput && !noChroot
	}
	return use || b.cfg.ChrootStore, nil
}

// Build realises reqs for one caller and returns one Result per request,
// in order. Build failures are reported in the Results (the derivation
// that failed, and DependencyFailed for those that needed it); the error
// is for requests that cannot be served at all (ctx cancelled, a check
// or repair without the sandbox, max-jobs 0). prog may be nil.
func (b *Builder) Build(ctx context.Context, reqs []store.DerivedPath, client ClientOptions, prog Progress) ([]Result, error) {
	switch {
	case client.Mode == ModeCheck && !b.sandboxed():
		return nil, fmt.Errorf("build: checking (--check) without the sandbox is %w by nixyard", errNotSupported)
	case client.Mode == ModeRepair && !b.sandboxed():
		return nil, fmt.Errorf("build: repairing by a rebuild without the sandbox is %w by nixyard", errNotSupported)
	}
	c := b.newCall(client, prog)
	defer c.close()
	results := make([]Result, len(reqs))
	reqCtx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	var wg sync.WaitGroup
	for i, r := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = c.realise(reqCtx, r, 0)
			results[i].Path = r
			if stopsOthers(results[i]) && !client.KeepGoing {
				stop(errStopped)
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if c.noLocalBuilds.Load() {
		return nil, c.noLocalBuildsError() // as Nix: the whole request fails
	}
	if client.Session != nil {
		for _, r := range results {
			for _, p := range r.BuiltOutputs {
				if err := client.Session.AddTempRoot(ctx, p); err != nil {
					return nil, err
				}
			}
		}
	}
	return results, nil
}

var errNotSupported = errors.New("not supported")

// ErrNoLocalBuilds fails a request that needs a build when max-jobs is 0
// (the daemon's or the caller's) and no remote machine is set up to take
// it, in Nix's words (see errNoMachineFits for when machines are set but
// none took it).
var ErrNoLocalBuilds = errors.New("unable to start any build; either increase '--max-jobs' or enable remote builds.\nhttps://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html")

// errNoMachineFits is ErrNoLocalBuilds where remote machines are set but
// none took the build, in Nix's words.
var errNoMachineFits error = noMachineFits{}

type noMachineFits struct{}

func (noMachineFits) Error() string {
	return "unable to start any build; remote machines may not have all required system features.\nhttps://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html"
}

func (noMachineFits) Is(target error) bool { return target == ErrNoLocalBuilds }

// noLocalBuildsError is the error of c's request when it needed a build
// that max-jobs 0 keeps from running here: Nix's two messages, as remote
// machines are set or not.
func (c *call) noLocalBuildsError() error {
	b := c.b
	builders, ok := c.opts.Settings["builders"]
	if !ok {
		if builders, ok = b.cfg.HookSettings["builders"]; !ok {
			builders = b.cfg.Builders
		}
	}
	if b.cfg.HookStore != "" && hasMachines(builders, 0) {
		return errNoMachineFits
	}
	return ErrNoLocalBuilds
}

// stopsOthers reports whether r, a failure, stops the caller's other
// builds without keep-going: as in Nix, a path that no cache has
// (NoSubstituters) does not, nor does a build that was itself stopped.
func stopsOthers(r Result) bool {
	return !r.Status.Success() && r.Status != NoSubstituters && !r.Stopped
}

// errStopped ends the builds a caller no longer needs because another of
// its builds failed and it did not ask to keep going.
var errStopped = errors.New("stopped because another build failed (use --keep-going to build what can be built)")

// lockChroot makes the sandbox root dir this job's until the returned
// unlock: the root is named after the derivation, and two jobs of one
// derivation (a check and a build, a goal and the one it is being
// replaced by) must not lay out or remove each other's.
func (b *Builder) lockChroot(ctx context.Context, dir string) (unlock func(), err error) {
	for {
		b.chrootMu.Lock()
		busy, ok := b.chroots[dir]
		if !ok {
			free := make(chan struct{})
			if b.chroots == nil {
				b.chroots = map[string]chan struct{}{}
			}
			b.chroots[dir] = free
			b.chrootMu.Unlock()
			return func() {
				b.chrootMu.Lock()
				delete(b.chroots, dir)
				b.chrootMu.Unlock()
				close(free)
			}, nil
		}
		b.chrootMu.Unlock()
		beforeWait(ctx)
		select {
		case <-busy:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Wait waits until every goal under way has ended and cleaned up its
// build directory and sandbox (a goal stopped because its clients left
// does so on its own goroutine), or until ctx ends: a daemon serving one
// client (--stdio) calls it before it exits.
func (b *Builder) Wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		b.running.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Waiting returns how many builds wait for a build slot now (monitoring).
func (b *Builder) Waiting() int { return b.slots.waiting() }
