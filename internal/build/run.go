package build

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/nixbase32"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/timerslack"
)

// Fixed identities inside the sandbox (Nix's sandboxUid/sandboxGid and
// sandbox-build-dir).
const (
	sandboxUID      = 1000
	sandboxGID      = 100
	sandboxBuildDir = "/build" // the default of Config.SandboxBuildDir
	homeDir         = "/homeless-shelter"
)

// job is one run of a derivation's builder.
type job struct {
	g       *goal
	drvAbs  string
	sandbox bool
	tmpDir  string // the build directory on the host
	chroot  string // the sandbox root on the host ("" unsandboxed)
	// impureHostDeps are host paths the derivation has in its sandbox
	// (__impureHostDeps, within allowed-impure-host-deps).
	impureHostDeps []string
	user           *buildUser
	hostUID        int
	hostGID        int
	outputs        map[string]storepath.Path // outputs to produce
	inputs         []storepath.Path          // closure of the inputs
	logFile        *os.File
	logTail        []string
	line           []byte
	linePos        int
	killMsg        string   // why the builder was killed (a timeout, too much log), once it was
	killStatus     Status   // and the status that gives the build
	spec           initSpec // what the helper sets up and runs
	keep           bool     // keep the build directory (a failed build with keep-failed)
	builtin        bool     // a builtin builder, run in the daemon (builtin.go)
	// rewrite replaces the outputs' placeholders with their paths in all
	// the builder gets.
	rewrite *strings.Replacer
	// unlockChroot gives the sandbox root's name back (lockChroot).
	unlockChroot func()
	// remote is the build hook that builds the derivation on another
	// machine (remote.go), nil for a build here.
	remote *hookProc
	// mu guards killMsg and killStatus and, for a remote build, the log
	// state, which the hook's two pipes write.
	mu sync.Mutex

	// A round of a repeated build (repeat, see goal.buildRounds): trial
	// for all but the last, whose outputs are hashed, compared and not
	// registered; prev are the NAR hashes of the previous round's
	// outputs (nil in the first), hashes this round's, and differs is
	// set when they differ.
	trial   bool
	prev    map[string]hash.Hash
	hashes  map[string]hash.Hash
	differs bool
}

// checkSuffix names where an output built again is kept beside the valid
// one (--check), or a repeated build's first round (Nix's checkSuffix).
const checkSuffix = ".check"

// prepare makes a job for the goal's builder: the build user, the build
// directory, the environment and (sandboxed) the chroot layout. It runs
// before the goal takes a build slot, so slots are held only while
// builders run. The job's cleanup must be called when done with it.
func (g *goal) prepare(ctx context.Context, inputs []storepath.Path, outputs map[string]storepath.Path) (*job, *Result) {
	b := g.b
	j := &job{g: g, drvAbs: b.abs(g.drvPath), outputs: outputs, inputs: inputs, hostUID: os.Geteuid(), hostGID: os.Getegid(), rewrite: g.placeholders()}
	if isBuiltin(g.drv.Builder) {
		// Run in the daemon, with a sandbox's view of the store (see
		// builtin.go), writing the outputs in place.
		j.builtin = true
		if g.mode != ModeNormal {
			r := g.failf(MiscFailure, "%s '%s', which has a builtin builder, is %v by nixyard", g.modeVerb(), j.drvAbs, errNotSupported)
			return nil, &r
		}
		if g.drv.Builder == builtinPrefix+"fetchurl" {
			// Its download runs as a build user (see builtinFetchurl).
			if err := j.takeBuildUser(ctx); err != nil {
				j.cleanup()
				r := g.failf(MiscFailure, "building '%s': %v", j.drvAbs, err)
				return nil, &r
			}
		}
		return j, nil
	}
	var err error
	if j.sandbox, err = b.useSandbox(g.drvPath, g.drv, g.attrs); err != nil {
		r := g.failf(MiscFailure, "%v", err)
		return nil, &r
	}
	chrootStore := false
	for _, p := range outputs {
		if b.st.RealPath(p) != b.abs(p) {
			j.sandbox, chrootStore = true, true // the builder must see the real store at the logical path
		}
	}
	fail := func(format string, args ...any) (*job, *Result) {
		j.cleanup()
		r := g.failf(MiscFailure, format, args...)
		return nil, &r
	}
	if j.sandbox && b.namespaceSupport() == namespacesNone {
		// As Nix: without the namespaces, build unsandboxed if allowed.
		if chrootStore || !b.cfg.SandboxFallback {
			return fail("building '%s': %v", j.drvAbs, errNoNamespaces)
		}
		j.sandbox = false
	}
	if j.sandbox && b.namespaceSupport() == namespacesNoUser && b.users == nil {
		// As Nix: without a user namespace the builder must be a build
		// user; as the daemon's root it would be root on the host.
		return fail("cannot perform a sandboxed build because user namespaces are not enabled; check /proc/sys/user/max_user_namespaces")
	}
	if !j.sandbox && g.mode != ModeNormal {
		// The valid outputs are left alone until the new ones are done:
		// the builder must write them elsewhere, in its sandbox.
		return fail("%s '%s' without the sandbox is %v by nixyard", g.modeVerb(), j.drvAbs, errNotSupported)
	}
	if err := j.takeBuildUser(ctx); err != nil {
		return fail("building '%s': %v", j.drvAbs, err)
	}
	if j.user != nil {
		j.hostUID, j.hostGID = j.user.uid, j.user.gid // the builder's, which owns what it writes
	}
	if !j.sandbox {
		if _, err := os.Lstat(homeDir); err == nil {
			return fail("home directory '%s' exists; please remove it to assure purity of builds without sandboxing", homeDir)
		}
	}
	j.tmpDir, err = createBuildDir(b.cfg.BuildDir, g.drv.Name)
	if err != nil {
		return fail("building '%s': %v", j.drvAbs, err)
	}
	if err := os.Chown(j.tmpDir, j.hostUID, j.hostGID); err != nil {
		return fail("building '%s': %v", j.drvAbs, err)
	}
	env, err := j.environment(ctx)
	var rej rejectedError
	if errors.As(err, &rej) {
		j.cleanup()
		r := g.failf(InputRejected, "%v", rej.error)
		return nil, &r
	} else if err != nil {
		return fail("building '%s': %v", j.drvAbs, err)
	}
	args := []string{path.Base(g.drv.Builder)}
	for _, a := range g.drv.Args {
		args = append(args, j.rewrite.Replace(a))
	}
	j.spec = initSpec{
		Builder:         g.drv.Builder,
		Args:            args,
		Env:             env,
		Dir:             j.tmpDir,
		TimerSlack:      timerslack.Inherited(),
		FilterSyscalls:  !b.cfg.NoSyscallFilter,
		NoNewPrivileges: !b.cfg.AllowNewPrivileges,
		// Unsandboxed, the helper takes the build user's identity itself,
		// once the filter is loaded.
		DropIDs: !j.sandbox && j.user != nil,
		HostUID: j.hostUID,
		HostGID: j.hostGID,
	}
	if j.spec.DropIDs {
		j.spec.Groups = j.user.groups
	}
	if j.sandbox {
		if j.impureHostDeps, err = j.allowedImpureHostDeps(); err != nil {
			return fail("%v", err)
		}
		if err := j.prepareChroot(ctx, &j.spec); err != nil {
			return fail("setting up the sandbox of '%s': %v", j.drvAbs, err)
		}
	}
	return j, nil
}

// takeBuildUser makes the job a build user's, if there are build users:
// the one a repeated build kept, or a free one. (A builder runs as it; a
// builtin's download too, whose output the daemon writes.)
func (j *job) takeBuildUser(ctx context.Context) error {
	b := j.g.b
	if b.users == nil {
		return nil
	}
	u := j.g.held.takeUser()
	if u == nil {
		var err error
		if u, err = b.users.acquire(ctx, b.log); err != nil {
			return err
		}
	}
	j.user = u
	// As Nix: nothing may still run as that user (left by a build of a
	// daemon that died, say), to meddle with this build.
	return u.killAll()
}

// cleanup removes the build directory (unless kept) and the chroot, and
// gives the build user back.
func (j *job) cleanup() {
	g := j.g
	b := g.b
	if j.tmpDir != "" {
		defer func() { j.tmpDir = "" }()
		if j.keep {
			// As Nix: open to the user who debugs the build.
			if err := os.Chmod(j.tmpDir, 0o755); err != nil {
				b.log.Warn("cannot open the kept build directory", "dir", j.tmpDir, "err", err)
			}
			b.log.Warn("keeping build directory", "drv", j.drvAbs, "dir", j.tmpDir)
			g.each(func(c *call) {
				c.emit(func(p Progress) {
					p.Error(fmt.Sprintf("note: keeping build directory '%s'", j.tmpDir))
				})
			})
		} else {
			removeTree(j.tmpDir)
		}
	}
	if j.chroot != "" {
		removeTree(j.chroot)
		j.chroot = ""
	}
	if j.unlockChroot != nil {
		j.unlockChroot()
		j.unlockChroot = nil
	}
	if j.user != nil {
		j.user.release()
		j.user = nil
	}
}

// build runs the prepared job's builder for outputs (the missing ones) and
// registers them. release gives the build slot back; it is called once
// the builder has exited.
func (j *job) build(ctx context.Context, outputs map[string]storepath.Path, locks *store.OutputLocks, release func()) Result {
	j.outputs = outputs
	res := Result{StartTime: time.Now()}
	outcome := j.run(ctx, locks, release)
	res.StopTime = time.Now()
	res.TimesBuilt = 1
	if outcome != nil {
		res.Status, res.ErrorMsg, res.HashMismatch = outcome.Status, outcome.Msg, outcome.hashMismatch
		res.TimesBuilt = outcome.timesBuilt
	} else {
		res.Status = Built
	}
	return res
}

// failure is a build that ran and failed.
type failure struct {
	Error
	timesBuilt   int
	hashMismatch bool // a fixed output's hash was not the declared one
}

func (j *job) failf(st Status, times int, format string, args ...any) *failure {
	return &failure{Error: Error{Status: st, Msg: fmt.Sprintf(format, args...)}, timesBuilt: times}
}

// run runs the job's builder (here, a builtin, or through the build hook
// on a remote machine), with its log stored and the callers told, gives
// the build slot back (release) once it has ended, then checks the
// outputs and registers them (or, for a remote build, checks those the
// hook brought), and runs the post-build hook. A round of a repeated
// build is compared with the previous one first. fail is nil on success.
func (j *job) run(ctx context.Context, locks *store.OutputLocks, release func()) (fail *failure) {
	g := j.g
	b := g.b
	defer func() {
		// A failure found after the builder (its outputs rejected, say)
		// stops the callers' queued builds too; one of the builder's was
		// told before its slot was given on, below.
		if fail != nil && ctx.Err() == nil {
			g.failing()
		}
		// A builtin builder writes the outputs in place (they were not
		// valid): what a failed one left there goes, as Nix's sandbox
		// would have kept it out of the store.
		if fail != nil && j.builtin {
			for _, p := range j.outputs {
				removeTree(b.st.RealPath(p))
			}
		}
	}()
	if !j.sandbox && j.remote == nil {
		// Leftovers of an earlier attempt at the output paths.
		for _, p := range j.outputs {
			if err := removeTree(b.st.RealPath(p)); err != nil {
				return j.failf(MiscFailure, 0, "building '%s': %v", j.drvAbs, err)
			}
		}
	}
	var err error
	j.logFile, err = os.CreateTemp(b.cfg.BuildDir, "nixyard-log-")
	if err != nil {
		return j.failf(MiscFailure, 0, "building '%s': %v", j.drvAbs, err)
	}
	// Only its descriptor is used: unlinked at once, it leaves nothing
	// behind a daemon killed mid-build.
	os.Remove(j.logFile.Name())
	defer j.logFile.Close()

	g.setRunning(true)
	if m := b.cfg.Metrics; m != nil {
		remote, start := j.remote != nil, time.Now()
		m.BuildStarted(remote)
		defer func() {
			result := "ok"
			switch {
			case fail != nil && ctx.Err() != nil:
				result = "cancelled"
			case fail != nil:
				result = "failed"
			}
			m.BuildEnded(remote, result, time.Since(start))
		}()
	}
	var status syscall.WaitStatus
	var runErr error
	switch {
	case j.remote != nil:
		status, runErr = j.runRemote(ctx)
	case j.builtin:
		status, runErr = j.runBuiltin(ctx)
	default:
		g.each(func(c *call) {
			c.emit(func(p Progress) {
				p.Chatty(fmt.Sprintf("executing builder '%s'", g.drv.Builder))
				p.Chatty(fmt.Sprintf("using builder args '%s'", strings.Join(g.drv.Args, " ")))
			})
		})
		status, runErr = j.execute(ctx, j.spec)
	}
	g.setRunning(false)
	builderFail := j.builderFailure(runErr, status)
	if builderFail != nil && ctx.Err() == nil {
		g.failing()
		if !j.trial {
			// Told before the slot goes, as Nix's worker logs a failed
			// goal's error before it starts the next build.
			g.tellFailure(builderFail)
		}
	}
	release()
	if _, err := j.logFile.Seek(0, io.SeekStart); err == nil && !b.cfg.NoBuildLogs {
		if err := b.st.PutBuildLog(context.WithoutCancel(ctx), g.drvPath, j.logFile); err != nil {
			b.log.Warn("cannot store build log", "drv", j.drvAbs, "err", err)
		}
	}
	defer func() {
		if !j.trial {
			return // the goal tells its end (see goal.run)
		}
		// A repeated build's round that others follow ends here.
		var err error
		if fail != nil {
			err = &fail.Error
		}
		g.mu.Lock()
		g.startTold = false
		g.mu.Unlock()
		g.each(func(c *call) { c.emit(func(p Progress) { p.BuildFinished(j.drvAbs, err) }) })
	}()
	if builderFail != nil {
		return builderFail
	}
	if j.trial || j.prev != nil {
		if f := j.compareRound(ctx); f != nil {
			return f
		}
		if j.trial && !j.differs {
			return nil // not registered: the next round builds again
		}
	}
	if j.remote != nil {
		if f := j.checkRemoteOutputs(ctx); f != nil {
			return f
		}
	} else if f := j.register(ctx, locks); f != nil {
		j.keep = g.keepFailed()
		return f
	}
	if f := b.cfg.OnBuilt; f != nil && g.mode == ModeNormal {
		f(ctx, slices.Collect(maps.Values(j.outputs)))
	}
	return j.postBuildHook(ctx)
}

// builderFailure is the failure of a builder that ended with runErr (it
// did not run) or status, or that was killed (killMsg); nil if it
// succeeded. A failed build's directory is kept with keep-failed.
func (j *job) builderFailure(runErr error, status syscall.WaitStatus) *failure {
	g := j.g
	switch {
	case runErr != nil:
		j.keep = g.keepFailed()
		return j.failf(MiscFailure, 0, "%v", runErr)
	case j.killMsg != "":
		j.keep = g.keepFailed()
		return j.failf(j.killStatus, 1, "%s", j.killMsg)
	case status.Exited() && status.ExitStatus() == 0:
		return nil
	}
	j.keep = g.keepFailed()
	msg := fmt.Sprintf("builder for '%s' %s", hint.Y(j.drvAbs), statusString(status))
	if len(j.logTail) > 0 {
		msg += fmt.Sprintf(";\nlast %d log lines:\n", len(j.logTail))
		for _, l := range j.logTail {
			msg += "> " + l + "\n"
		}
		msg += fmt.Sprintf("For full logs, run '%s'.", hint.B("nix log "+j.drvAbs))
	}
	// As Nix: a fixed-output derivation (which may use the network)
	// failing may succeed another time; a build hook that failed is a
	// miscellaneous failure, unless it says it timed out (101).
	st := PermanentFailure
	if kind, _ := g.drv.Kind(); kind == derivation.FixedOutput {
		st = TransientFailure
	}
	// As Nix: a builder that failed with the store's or the build
	// directory's file system (nearly) full may have failed for it.
	if j.remote == nil && j.diskFull() {
		msg += "\nnote: build failure may have been caused by lack of free disk space"
		st = TransientFailure
	}
	if j.remote != nil {
		st = MiscFailure
		if status.Exited() && status.ExitStatus() == 101 {
			st = TimedOut
		}
	}
	return j.failf(st, 1, "%s", msg)
}

// environment returns the builder's environment, as Nix 2.8's initEnv,
// and writes the files it names into the build directory: passAsFile's,
// exportReferencesGraph's, and with structured attributes .attrs.json and
// .attrs.sh (whose variables replace the derivation's environment).
func (j *job) environment(ctx context.Context) ([]string, error) {
	g := j.g
	b := g.b
	top := j.tmpDir
	if j.sandbox {
		top = b.cfg.SandboxBuildDir
	}
	env := map[string]string{
		"PATH":            "/path-not-set",
		"HOME":            homeDir,
		"NIX_STORE":       string(b.st.Dir()),
		"NIX_BUILD_CORES": strconv.Itoa(j.cores()),
	}
	structured := g.attrs.Structured() != nil
	if !structured {
		passAsFile := map[string]bool{}
		for _, n := range derivation.Tokenize(g.drv.Env["passAsFile"]) {
			passAsFile[n] = true
		}
		// In key order, as Nix: a variable named like a file's (fooPath)
		// wins over it.
		for _, k := range slices.Sorted(maps.Keys(g.drv.Env)) {
			v := g.drv.Env[k]
			if !passAsFile[k] {
				env[k] = v
				continue
			}
			fn := ".attr-" + nixbase32.EncodeToString(hash.Sum(hash.SHA256, []byte(k)).Digest)
			if err := j.writeBuildFile(fn, []byte(j.rewrite.Replace(v)), true); err != nil {
				return nil, err
			}
			env[k+"Path"] = top + "/" + fn
		}
	}
	env["NIX_BUILD_TOP"] = top
	for _, k := range []string{"TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"} {
		env[k] = top
	}
	if kind, _ := g.drv.Kind(); kind == derivation.FixedOutput {
		env["NIX_OUTPUT_CHECKED"] = "1"
		impure, _, err := g.attrs.Strings("impureEnvVars")
		if err != nil {
			return nil, err
		}
		for _, k := range impure {
			if daemonSecrets[k] {
				env[k] = "" // as if unset
				continue
			}
			env[k] = os.Getenv(k)
		}
	}
	env["NIX_LOG_FD"] = "2"
	env["TERM"] = "xterm-256color"
	if structured {
		files, err := j.writeStructuredAttrs(ctx, top)
		if err != nil {
			return nil, err
		}
		for k, v := range files {
			env[k] = v
		}
	} else if err := j.writeReferencesGraphs(ctx); err != nil {
		return nil, err
	}
	out := make([]string, 0, len(env))
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, j.rewrite.Replace(k+"="+env[k]))
	}
	return out, nil
}

// execute starts the builder through the helper, copies its output to
// the log and the callers, enforces the timeouts, and returns its wait
// status. runErr is an error starting it (nothing ran).
func (j *job) execute(ctx context.Context, spec initSpec) (status syscall.WaitStatus, runErr error) {
	var files childFiles
	pr, pw, err := files.pipe()
	if err != nil {
		return 0, err
	}
	defer pr.Close()
	specR, specW, err := files.pipe()
	if err != nil {
		files.closeAll()
		return 0, err
	}
	statusR, statusW, err := files.pipe()
	if err != nil {
		files.closeAll()
		return 0, err
	}
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		files.closeAll()
		return 0, err
	}
	defer devNull.Close()
	cmd := &exec.Cmd{
		Path:       "/proc/self/exe",
		Args:       []string{initArg0},
		Env:        []string{},
		Stdin:      devNull,
		Stdout:     pw,
		Stderr:     pw,
		ExtraFiles: []*os.File{specR, statusW},
	}
	// The helper leads a process group of its own, which the builder (or,
	// sandboxed, the PID namespace's first process, which takes every
	// process in it along) shares: killing the group kills the build. The
	// helper makes the sandbox's namespaces itself, so this is a plain
	// (vfork) spawn.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setsid: true}
	if err := cmd.Start(); err != nil {
		files.closeAll()
		return 0, fmt.Errorf("starting the builder of '%s': %w", j.drvAbs, err)
	}
	pw.Close()
	specR.Close()
	statusW.Close()
	proc := &procGroup{cmd: cmd}
	kill := proc.kill
	specData, specErr := spec.encode()
	if specErr == nil {
		_, specErr = specW.Write(specData)
	}
	specW.Close()
	setupMsg, _ := io.ReadAll(io.LimitReader(statusR, 64<<10))
	statusR.Close()
	if specErr != nil || len(setupMsg) > 0 {
		kill()
		proc.wait()
		if len(setupMsg) == 0 {
			setupMsg = []byte(specErr.Error())
		}
		return 0, fmt.Errorf("while setting up the build environment of '%s': %s", j.drvAbs, bytes.TrimSpace(setupMsg))
	}

	onKill := func(st Status, msg string) {
		j.recordKill(st, msg)
		kill()
	}
	// The limits are looked up as the build runs: a client that joins it
	// may bring a longer one (see goal.limits).
	onData, stopWatch := j.watchLimits(true, func(msg string) { onKill(TimedOut, msg) })
	defer stopWatch()
	stopCtx := context.AfterFunc(ctx, kill)
	defer stopCtx()

	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		j.copyOutput(pr, nil, onData, func(msg string) { onKill(LogLimitExceeded, msg) })
	}()
	werr := proc.wait() // and whatever the builder left in its group
	var killErr error
	if !j.sandbox && j.user != nil {
		// Processes that left the group: sandboxed, the PID namespace
		// ended them all.
		killErr = j.user.killAll()
	}
	awaitOutput(readDone, pr)
	if len(j.line) > 0 {
		j.flushLine()
	}
	if killErr != nil {
		return 0, killErr
	}
	var ee *exec.ExitError
	if werr != nil && !errors.As(werr, &ee) {
		return 0, fmt.Errorf("waiting for the builder of '%s': %w", j.drvAbs, werr)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if ctx.Err() != nil && j.killMsg == "" {
		return 0, fmt.Errorf("building '%s': %w", j.drvAbs, ctx.Err())
	}
	return cmd.ProcessState.Sys().(syscall.WaitStatus), nil
}

// recordKill records why the builder is being killed, unless a reason
// was recorded already: the first one is the build's.
func (j *job) recordKill(st Status, msg string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.killMsg == "" {
		j.killMsg, j.killStatus = msg, st
	}
}

// copyOutput copies a builder's output from r, until it ends, into the
// log file and to the callers, with mu (if not nil) held for each piece:
// onData (if not nil) runs for every piece read, and once the output
// passes max-build-log-size, overLimit gets the message to kill the
// builder with and the rest is drained unlogged.
func (j *job) copyOutput(r io.Reader, mu sync.Locker, onData func(), overLimit func(msg string)) {
	buf := make([]byte, 32<<10)
	var logSize int64
	maxLog := j.g.b.cfg.MaxLogSize
	if m := j.g.owner.opts.MaxLogSize; m != 0 {
		maxLog = max(m, 0)
	}
	for {
		n, err := r.Read(buf)
		if n > 0 && (maxLog == 0 || logSize <= maxLog) {
			if onData != nil {
				onData()
			}
			if logSize += int64(n); maxLog > 0 && logSize > maxLog {
				overLimit(hint.Fmt("%s killed after writing more than %d bytes of log output", j.g.name, maxLog))
				continue
			}
			if mu != nil {
				mu.Lock()
			}
			j.logFile.Write(buf[:n])
			j.handleOutput(buf[:n])
			if mu != nil {
				mu.Unlock()
			}
		}
		if err != nil {
			return
		}
	}
}

// awaitOutput waits until done is closed (the builder's output has
// ended), closing pipes after 2 s: a process that left the builder's
// group may keep them open.
func awaitOutput(done <-chan struct{}, pipes ...io.Closer) {
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		for _, p := range pipes {
			p.Close()
		}
		<-done
	}
}

// cores is the builder's NIX_BUILD_CORES: the daemon's cores, or fewer
// if the caller that owns the build asked for fewer.
func (j *job) cores() int {
	cores := j.g.b.cfg.Cores
	if c := j.g.owner.opts.Cores; c > 0 && c < cores {
		cores = c
	}
	return cores
}

// daemonSecrets are the variables of the daemon's environment that hold
// its own credentials (for --push-to s3://): a fixed-output derivation's
// impureEnvVars, which any client may write, do not pass them on. Every
// other variable of the daemon's environment can be read so, as with
// nix-daemon.
var daemonSecrets = map[string]bool{
	"AWS_ACCESS_KEY_ID":                 true,
	"AWS_SECRET_ACCESS_KEY":             true,
	"AWS_SESSION_TOKEN":                 true,
	"AWS_CONTAINER_AUTHORIZATION_TOKEN": true,
}

// limitsTick is how often a running builder's time and silence are
// checked against its limits (Nix checks once a second).
const limitsTick = 100 * time.Millisecond

// watchLimits checks, until stop is called, the builder's running time
// against the goal's limits, and, with silence, its silence since it was
// last told of output (output), and calls timedOut once with Nix's
// message when one is passed.
func (j *job) watchLimits(silence bool, timedOut func(msg string)) (output, stop func()) {
	start := time.Now()
	var last atomic.Int64
	last.Store(start.UnixNano())
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(limitsTick)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case now := <-tick.C:
				maxSilent, timeout := j.g.limits()
				switch {
				case timeout > 0 && now.Sub(start) >= timeout:
					timedOut(hint.Fmt("%s timed out after %d seconds", j.g.name, int(timeout.Seconds())))
					return
				case silence && maxSilent > 0 && now.UnixNano()-last.Load() >= int64(maxSilent):
					timedOut(hint.Fmt("%s timed out after %d seconds of silence", j.g.name, int(maxSilent.Seconds())))
					return
				}
			}
		}
	}()
	return func() { last.Store(time.Now().UnixNano()) }, func() { close(done) }
}

// handleOutput splits builder output into lines as Nix does: '\r' moves
// back to the start of the line, '\n' ends it.
func (j *job) handleOutput(data []byte) {
	for _, c := range data {
		switch c {
		case '\r':
			j.linePos = 0
		case '\n':
			j.flushLine()
		default:
			if j.linePos < len(j.line) {
				j.line[j.linePos] = c
			} else {
				j.line = append(j.line, c)
			}
			j.linePos++
		}
	}
}

func (j *job) flushLine() {
	line := string(j.line)
	j.line = j.line[:0]
	j.linePos = 0
	j.logLine(line)
}

// logLine is one line of the builder's output: a phase it announces, or
// a line for the callers and the log tail.
func (j *job) logLine(line string) {
	if rest, ok := strings.CutPrefix(line, "@nix "); ok {
		var msg struct {
			Action string `json:"action"`
			Phase  string `json:"phase"`
		}
		if json.Unmarshal([]byte(rest), &msg) == nil {
			if msg.Action == "setPhase" {
				j.g.each(func(c *call) { c.emit(func(p Progress) { p.BuildPhase(j.drvAbs, msg.Phase) }) })
			}
			return
		}
	}
	j.logTail = append(j.logTail, line)
	if n := j.logLines(); len(j.logTail) > n {
		j.logTail = j.logTail[len(j.logTail)-n:]
	}
	j.g.each(func(c *call) { c.emit(func(p Progress) { p.BuildLogLine(j.drvAbs, line) }) })
}

// logLines is how many last lines of the builder's output a failure
// message shows: the log-lines of the caller that started the build (a
// trusted one's), or the daemon's.
func (j *job) logLines() int {
	n := j.g.b.cfg.LogLines
	if o := j.g.owner.opts.LogLines; o != 0 {
		n = o
	}
	return max(n, 0)
}

// diskFullBytes is how little room left Nix takes for a full disk.
const diskFullBytes = 8 << 20

// diskFull reports whether the store's or the build directory's file
// system has less than diskFullBytes available (Nix's heuristic: the
// builder's error cannot tell).
func (j *job) diskFull() bool {
	if n, err := j.g.b.st.AvailableBytes(); err == nil && n < diskFullBytes {
		return true
	}
	var st unix.Statfs_t
	return j.tmpDir != "" && unix.Statfs(j.tmpDir, &st) == nil && st.Bavail*uint64(st.Frsize) < diskFullBytes
}

// statusString is Nix's statusToString for a failed builder.
func statusString(ws syscall.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("failed with exit code %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Sprintf("failed due to signal %d (%s)", int(ws.Signal()), signalDescription(ws.Signal()))
	}
	return "died abnormally"
}

// signalDescription is strsignal(3) of glibc for the common signals.
func signalDescription(s syscall.Signal) string {
	d := s.String()
	if d == "" {
		return "Unknown signal " + strconv.Itoa(int(s))
	}
	return strings.ToUpper(d[:1]) + d[1:]
}

// outputLocation is where the builder leaves output p on the host.
func (j *job) outputLocation(p storepath.Path) string {
	if j.chroot != "" {
		return j.chroot + j.g.b.abs(p)
	}
	return j.g.b.st.RealPath(p)
}

// register checks the outputs and registers them (or, in check mode,
// compares them with the valid ones).
func (j *job) register(ctx context.Context, locks *store.OutputLocks) *failure {
	g := j.g
	b := g.b
	var outs []store.BuiltOutput
	var kept []storepath.Path // intact outputs a repair leaves as they are
	var mismatch string
	for _, name := range slices.Sorted(maps.Keys(j.outputs)) {
		p := j.outputs[name]
		loc := j.outputLocation(p)
		var st unix.Stat_t
		if err := unix.Lstat(loc, &st); err != nil {
			return j.failf(OutputRejected, 1, "%s", hint.Fmt("builder for '%s' failed to produce output path for output '%s' at '%s'", j.drvAbs, name, loc))
		}
		if (st.Mode&unix.S_IFMT != unix.S_IFLNK && st.Mode&(unix.S_IWGRP|unix.S_IWOTH) != 0) ||
			(j.user != nil && int(st.Uid) != j.hostUID) {
			return j.failf(OutputRejected, 1, "suspicious ownership or permission on '%s' for output '%s'; rejecting this build output", loc, name)
		}
		bo := store.BuiltOutput{Name: name, Path: p, Replace: g.mode == ModeRepair}
		if loc != b.st.RealPath(p) {
			bo.Src = loc
		}
		o := g.drv.Outputs[name]
		if o.Hash != "" {
			ca, got, err := fixedOutputHash(o.HashAlgo, loc)
			if err != nil {
				return j.failf(OutputRejected, 1, "output '%s' of '%s': %v", name, j.drvAbs, err)
			}
			if want := o.Hash; got.Base16() != want {
				wantHash := hash.Hash{Algo: got.Algo}
				wantHash.Digest, _ = hex.DecodeString(want)
				mismatch = hint.Fmt("hash mismatch in fixed-output derivation '%s':\n  specified: %s\n     got:    %s", j.drvAbs, wantHash.SRI(), got.SRI())
				// Nix registers the output under the path of what it got.
				actual, err := ca.StorePath(b.st.Dir(), g.drv.Name, nil, false)
				if err != nil {
					return j.failf(OutputRejected, 1, "%s", mismatch)
				}
				bo.Path, bo.Src = actual, loc
			}
			bo.CA = ca.String()
		}
		if g.mode == ModeCheck {
			if f := j.check(ctx, name, p, loc); f != nil {
				return f
			}
			continue
		}
		if g.mode == ModeRepair {
			// Only what is missing or damaged is replaced: an intact output
			// keeps its files and info, and the rebuilt copy is dropped
			// with the sandbox.
			if good, err := b.st.ContentsGood(ctx, p); err == nil && good {
				kept = append(kept, p)
				continue
			}
		}
		outs = append(outs, bo)
	}
	if g.mode == ModeCheck {
		return nil
	}
	check := func(infos map[string]store.PathInfo) error { return j.checkOutputs(ctx, infos) }
	// A kept output is still one the others may refer to.
	if _, err := locks.Register(ctx, g.drvPath, outs, append(slices.Clone(j.inputs), kept...), check); err != nil {
		return j.failf(OutputRejected, 1, "%v", err)
	}
	if mismatch != "" {
		f := j.failf(OutputRejected, 1, "%s", mismatch)
		f.hashMismatch = true
		return f
	}
	return nil
}

// check compares a rebuilt output with the valid one (--check).
func (j *job) check(ctx context.Context, name string, p storepath.Path, loc string) *failure {
	b := j.g.b
	info, err := b.st.QueryPathInfo(ctx, p)
	if err != nil {
		return nil // not valid: nothing to compare with
	}
	h, err := canonicalNarHash(loc)
	if err != nil {
		return j.failf(MiscFailure, 1, "output '%s' of '%s': %v", name, j.drvAbs, err)
	}
	if h.Equal(info.NarHash) {
		return nil
	}
	if !j.g.keepFailed() && !b.cfg.RunDiffHook {
		return j.failf(NotDeterministic, 1, "%s", hint.Fmt("derivation '%s' may not be deterministic: output '%s' differs", j.drvAbs, b.st.RealPath(p)))
	}
	// As Nix: the new output is kept beside the valid one, for the diff
	// hook and for whoever looks.
	dst := b.st.RealPath(p) + checkSuffix
	if moving, err := moveAside(loc, dst); moving {
		return j.failf(MiscFailure, 1, "keeping output '%s' of '%s': %v", name, j.drvAbs, err)
	} else if err != nil {
		return j.failf(MiscFailure, 1, "output '%s' of '%s': %v", name, j.drvAbs, err)
	}
	j.diffHook(ctx, b.abs(p), dst)
	return j.failf(NotDeterministic, 1, "%s", hint.Fmt("derivation '%s' may not be deterministic: output '%s' differs from '%s'", j.drvAbs, b.st.RealPath(p), dst))
}

// canonicalNarHash canonicalises the output at loc (as registering it
// would) and returns the SHA-256 of its NAR.
func canonicalNarHash(loc string) (hash.Hash, error) {
	if err := nar.Canonicalise(loc); err != nil {
		return hash.Hash{}, err
	}
	h := hash.SHA256.New()
	if err := nar.DumpPath(h, loc); err != nil {
		return hash.Hash{}, err
	}
	return hash.FromHasher(hash.SHA256, h), nil
}

// moveAside moves an output built at loc to dst, beside the valid one
// (<path>.check), replacing what is there, and gives it to the daemon's
// user, as Nix keeps an output that differs. moving reports that the
// last step, the move itself, is what failed.
func moveAside(loc, dst string) (moving bool, err error) {
	if err := removeTree(dst); err != nil {
		return false, err
	}
	if err := store.ChownTree(loc, os.Geteuid(), os.Getegid()); err != nil {
		return false, err
	}
	if err := os.Rename(loc, dst); err != nil {
		return true, err
	}
	return false, nil
}

// fixedOutputHash hashes a fixed output as its derivation says (flat: the
// file's contents, which must be a non-executable regular file; "r:":
// its NAR).
func fixedOutputHash(algoSpec, loc string) (contentaddress.CA, hash.Hash, error) {
	algoName, recursive := strings.CutPrefix(algoSpec, "r:")
	algo, err := hash.ParseAlgo(algoName)
	if err != nil {
		return contentaddress.CA{}, hash.Hash{}, err
	}
	h := algo.New()
	method := contentaddress.NAR
	if recursive {
		if err := nar.DumpPath(h, loc); err != nil {
			return contentaddress.CA{}, hash.Hash{}, err
		}
	} else {
		method = contentaddress.Flat
		var st unix.Stat_t
		if err := unix.Lstat(loc, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&unix.S_IXUSR != 0 {
			return contentaddress.CA{}, hash.Hash{}, fmt.Errorf("output path '%s' should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)", loc)
		}
		f, err := os.Open(loc)
		if err != nil {
			return contentaddress.CA{}, hash.Hash{}, err
		}
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return contentaddress.CA{}, hash.Hash{}, err
		}
	}
	got := hash.FromHasher(algo, h)
	return contentaddress.CA{Method: method, Hash: got}, got, nil
}

// removeTree deletes a tree, making directories writable first (store
// outputs and build directories may be read-only).
func removeTree(p string) error {
	err := os.RemoveAll(p)
	if err == nil {
		return nil
	}
	makeDirsWritable(p)
	return os.RemoveAll(p)
}

// makeDirsWritable makes p, if it is a directory, and every directory
// under it, 0700 (symlinks are not followed); errors are ignored, as the
// removal that follows reports what still fails.
func makeDirsWritable(p string) {
	var st unix.Stat_t
	if unix.Lstat(p, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return
	}
	unix.Chmod(p, 0o700)
	ents, _ := os.ReadDir(p)
	for _, e := range ents {
		makeDirsWritable(p + "/" + e.Name())
	}
}

// createBuildDir creates a build directory (mode 0700) under root (the
// system's temporary directory if empty) and names it as Nix does, so
// that users find what --keep-failed kept where they expect it:
// nix-build-<name>.drv-<n>, with the first n from 0 that is free.
func createBuildDir(root, name string) (string, error) {
	if root == "" {
		root = os.TempDir()
	}
	for n := 0; ; n++ {
		dir := filepath.Join(root, fmt.Sprintf("nix-build-%s.drv-%d", name, n))
		err := os.Mkdir(dir, 0o700)
		if err == nil {
			return dir, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return "", fmt.Errorf("creating the build directory: %w", err)
		}
	}
}
