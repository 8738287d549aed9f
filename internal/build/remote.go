package build

// Remote builds. As nix-daemon does, the Builder offers every derivation
// it may send elsewhere to Nix's build hook (nix.conf build-hook, Nix's
// build-remote), which picks a machine from `builders`, copies the
// inputs there, has the machine build the derivation and copies the
// outputs back. The hook reaches the store through the daemon's own
// socket (Config.HookStore), so the outputs come in as any client's
// uploads do: checked, made durable, then registered.
//
// The hook protocol, as Nix 2.8 speaks it (HookInstance and
// DerivationGoal::tryBuildHook): the hook's stdin gets the settings
// (1, name, value for each, then 0), then for each offer "try", whether
// this host would build it itself, the platform, the .drv's path and its
// required system features. The hook answers on its stderr (which is
// also its stdout) with a line "# accept", "# decline", "# postpone" or
// "# decline-permanently", after any log lines (JSON, "@nix {…}"). After
// "# accept" it names the machine on the next line and reads the inputs'
// closure and the names of the outputs to bring back; stdin is then
// closed. The remote builder's output comes on fd 4 (ssh://) or as JSON
// build-log results on stderr (ssh-ng://). The hook exits 0 once the
// outputs are valid here.

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// hookRetry is how long a build that every suitable machine is too busy
// for waits before it is offered again, unless a remote build ends first
// (Nix's poll-interval). A variable for tests.
var hookRetry = 5 * time.Second

// hookMaxIdle bounds how long an idle hook is kept, and maxIdleHooks how
// many: a hook reads the machine files when it starts, so one kept for
// long would not see them change. A hook serves one request only, as
// nix-daemon's serve one client connection: it remembers a machine that
// failed it, and a later client must find that machine tried again.
// maxOffers bounds the offers under way at once, each a hook process (Nix
// asks one hook at a time per client).
const (
	hookMaxIdle  = 30 * time.Second
	maxIdleHooks = 8
	maxOffers    = 8
)

// Log levels and result types of Nix's JSON logger that the hook's
// messages carry.
const (
	hookLvlWarn         = 1
	hookResBuildLogLine = 101
	hookActBuildWaiting = 111
)

type hookReply int

const (
	hookDecline hookReply = iota
	hookDeclinePermanently
	hookPostpone
	hookAccept
)

// hookProc is a running build hook.
type hookProc struct {
	procGroup
	key   string // the settings it was started with
	enc   *hookWriter
	stdin *os.File
	from  *bufio.Reader // its stdout and stderr
	fromF *os.File
	logR  *os.File // what a remote builder writes (the hook's fd 4)

	idleSince time.Time // when it was kept for later (putHook)

}

// hookPool keeps the hooks that declined or postponed an offer, for the
// next one: a hook that accepted is used up by that build. Builder.mu
// guards it.
type hookPool struct {
	idle map[string][]*hookProc // by hookKey, the longest idle first
	// expiry runs expireHooks once the longest idle hook has been idle
	// for hookMaxIdle; nil when no hook is kept.
	expiry *time.Timer
	closed bool          // Builder.Close ran: no hook is kept any more
	wake   chan struct{} // closed and replaced when a remote build ends
	offers chan struct{} // a token per offer under way (maxOffers)
}

// remoteSettings are the settings the hook gets for a goal: the daemon's,
// the caller's overrides, the store to reach this daemon through, and
// builders with its default. The hook reads nix.conf too; what it is sent
// wins, as with Nix.
func (g *goal) remoteSettings(c *call) map[string]string {
	b := g.b
	s := maps.Clone(b.cfg.HookSettings)
	if s == nil {
		s = map[string]string{}
	}
	if _, ok := s["builders"]; !ok {
		s["builders"] = b.cfg.Builders
	}
	// What the client set in SetOptions' own fields, as nix-daemon's
	// settings would hold it.
	// The clients' timeout and max-silent-time are not sent: the build is
	// held to them here, as they change while it runs (see goal.limits and
	// runRemote); the remote machine applies the daemon's own.
	o := c.opts
	for name, on := range map[string]bool{"keep-failed": o.KeepFailed, "keep-going": o.KeepGoing, "fallback": o.TryFallback} {
		if on {
			s[name] = "true"
		}
	}
	maps.Copy(s, c.opts.Settings)
	s["store"] = b.cfg.HookStore
	return s
}

// hasMachines reports whether a builders setting may name a machine: its
// entries are separated by ';' or newlines, '#' starts a comment, and
// "@FILE" reads more from FILE (a missing one names none), as Nix parses
// it. It says false only when the setting surely names no machine, so
// that no hook is started for nothing.
func hasMachines(spec string, depth int) bool {
	for _, line := range strings.FieldsFunc(spec, func(r rune) bool { return r == ';' || r == '\n' }) {
		line, _, _ = strings.Cut(line, "#")
		line = strings.TrimSpace(line)
		switch {
		case line == "":
		case strings.HasPrefix(line, "@"):
			data, err := os.ReadFile(strings.TrimSpace(line[1:]))
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil || depth >= 8 || hasMachines(string(data), depth+1) {
				return true
			}
		default:
			return true
		}
	}
	return false
}

// tryRemote offers the goal's build to the build hook, as Nix's
// tryToBuild does, and if a machine takes it, builds it there: done, with
// the build's result. Otherwise the goal is built here, if it may be:
// slot, if not nil, is a local build slot taken for it (the hook was told
// this host would build it now), which the caller must give back. A build
// that every suitable machine is too busy for, and that has no slot here,
// is offered again when a build ends or after hookRetry.
func (g *goal) tryRemote(ctx context.Context, inputs []storepath.Path, outputs map[string]storepath.Path, features []string) (res Result, done bool, slot func()) {
	b := g.b
	c := g.caller()
	if b.cfg.HookStore == "" || g.basic || c.noHook.Load() {
		return Result{}, false, nil
	}
	settings := g.remoteSettings(c)
	if !hasMachines(settings["builders"], 0) {
		return Result{}, false, nil
	}
	drvAbs := b.abs(g.drvPath)
	var missing []string
	for _, name := range slices.Sorted(maps.Keys(outputs)) {
		ok, err := b.st.IsValidPathFresh(ctx, outputs[name])
		if err != nil {
			return g.failf(MiscFailure, "building '%s': %v", drvAbs, err), true, nil
		}
		if !ok {
			missing = append(missing, name)
		}
	}
	if len(missing) == 0 {
		return Result{Status: AlreadyValid}, true, nil
	}
	canHere := g.mayBuild() && b.canBuild(g.drv, features) == nil
	release := func() {
		if slot != nil {
			slot()
			slot = nil
		}
	}
	stopped := func() (Result, bool, func()) {
		release()
		return g.failf(MiscFailure, "building '%s': %v", drvAbs, context.Cause(ctx)), true, nil
	}
	retried, waited := false, false
	// While postponed, the callers see Nix's "waiting for a machine"
	// activity (id 0: the hook's own ids are never 0).
	defer func() {
		if waited {
			g.each(func(c *call) { c.emit(func(p Progress) { p.RemoteActivity(drvAbs, RemoteEvent{Action: "stop"}) }) })
		}
	}()
	for {
		freed := b.slots.freedCh()
		b.mu.Lock()
		wake := b.hooks.wake
		b.mu.Unlock()
		// The hook first: a slot reserved here must not sit idle while
		// other offers (each maybe connecting to a machine) go first.
		h, reused, err := b.takeHook(ctx, c, settings)
		if err != nil {
			if ctx.Err() != nil {
				return stopped()
			}
			b.log.Warn("cannot start the build hook; building here", "drv", drvAbs, "err", err)
			g.each(func(c *call) {
				c.emit(func(p Progress) { p.Error(fmt.Sprintf("cannot start the build hook: %v", err)) })
			})
			c.noHook.Store(true)
			return Result{}, false, nil
		}
		if canHere {
			slot, _ = b.slots.tryAcquire(g.owner.client)
		}
		reply, err := h.try(ctx, g, slot != nil, features)
		b.offerDone()
		switch {
		case err != nil:
			h.end()
			if ctx.Err() != nil {
				return stopped()
			}
			if reused && !retried {
				// A kept hook that has died since: ask a new one.
				retried = true
				release()
				continue
			}
			g.each(func(c *call) {
				c.emit(func(p Progress) { p.Error(fmt.Sprintf("build hook died unexpectedly: %v", err)) })
			})
			return Result{}, false, slot
		case reply == hookDeclinePermanently:
			h.end()
			c.noHook.Store(true)
			return Result{}, false, slot
		case reply == hookDecline:
			b.putHook(h)
			return Result{}, false, slot
		case reply == hookPostpone:
			b.putHook(h)
			release()
			if !waited {
				b.log.Info("waiting for a machine to build", "drv", drvAbs)
				waited = true
				ev := RemoteEvent{Action: "start", Level: hookLvlWarn, Type: hookActBuildWaiting, Text: fmt.Sprintf("waiting for a machine to build '%s'", drvAbs)}
				g.each(func(c *call) { c.emit(func(p Progress) { p.RemoteActivity(drvAbs, ev) }) })
			}
			t := time.NewTimer(hookRetry)
			select {
			case <-ctx.Done():
				t.Stop()
				return stopped()
			case <-wake:
			case <-freed:
			case <-t.C:
			}
			t.Stop()
			continue
		}
		release()
		defer b.remoteBuildEnded()
		return g.buildRemote(ctx, h, inputs, outputs, missing), true, nil
	}
}

// hookKey names a hook by the request it serves and the settings it was
// started with.
func hookKey(c *call, settings map[string]string) string {
	var key strings.Builder
	fmt.Fprintf(&key, "call %d\n", c.id)
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		fmt.Fprintf(&key, "%q=%q\n", k, settings[k])
	}
	return key.String()
}

// dropHooks ends the idle hooks of the request c, which has ended.
func (b *Builder) dropHooks(c *call) {
	prefix := fmt.Sprintf("call %d\n", c.id)
	var ended []*hookProc
	b.mu.Lock()
	for k, idle := range b.hooks.idle {
		if strings.HasPrefix(k, prefix) {
			ended = append(ended, idle...)
			delete(b.hooks.idle, k)
		}
	}
	b.mu.Unlock()
	for _, h := range ended {
		h.end()
	}
}

// takeHook waits until fewer than maxOffers offers are under way, then
// returns an idle hook of c's started with settings (reused) or starts one. The
// caller calls offerDone once it has the hook's answer.
func (b *Builder) takeHook(ctx context.Context, c *call, settings map[string]string) (h *hookProc, reused bool, err error) {
	select {
	case b.hooks.offers <- struct{}{}:
	case <-ctx.Done():
		return nil, false, context.Cause(ctx)
	}
	key := hookKey(c, settings)
	b.mu.Lock()
	if idle := b.hooks.idle[key]; len(idle) > 0 {
		h = idle[len(idle)-1]
		b.hooks.idle[key] = idle[:len(idle)-1]
		if len(idle) == 1 {
			delete(b.hooks.idle, key)
		}
	}
	b.mu.Unlock()
	if h != nil {
		return h, true, nil
	}
	if h, err = b.startHook(key, settings); err != nil {
		b.offerDone()
		return nil, false, err
	}
	return h, false, nil
}

// offerDone ends an offer that takeHook let start.
func (b *Builder) offerDone() { <-b.hooks.offers }

// putHook keeps h for the next offer (or, after Close, ends it). With
// maxIdleHooks kept, the one idle longest goes; any idle for hookMaxIdle
// goes then.
func (b *Builder) putHook(h *hookProc) {
	h.idleSince = time.Now()
	var drop *hookProc
	b.mu.Lock()
	if b.hooks.closed {
		b.mu.Unlock()
		h.end()
		return
	}
	if b.hooks.idle == nil {
		b.hooks.idle = map[string][]*hookProc{}
	}
	n, oldestKey := 0, ""
	for k, idle := range b.hooks.idle {
		n += len(idle)
		if drop == nil || idle[0].idleSince.Before(drop.idleSince) {
			drop, oldestKey = idle[0], k
		}
	}
	if n >= maxIdleHooks {
		b.hooks.idle[oldestKey] = b.hooks.idle[oldestKey][1:]
		if len(b.hooks.idle[oldestKey]) == 0 {
			delete(b.hooks.idle, oldestKey)
		}
	} else {
		drop = nil
	}
	b.hooks.idle[h.key] = append(b.hooks.idle[h.key], h)
	if b.hooks.expiry == nil {
		b.hooks.expiry = time.AfterFunc(hookMaxIdle, b.expireHooks)
	}
	b.mu.Unlock()
	if drop != nil {
		drop.end()
	}
}

// expireHooks ends the hooks idle for hookMaxIdle or more, and has itself
// run again when the longest idle of those left will have been.
func (b *Builder) expireHooks() {
	var stale []*hookProc
	var next time.Time // the earliest idleSince of the hooks left
	b.mu.Lock()
	for k, idle := range b.hooks.idle {
		i := 0
		for i < len(idle) && time.Since(idle[i].idleSince) >= hookMaxIdle {
			i++
		}
		stale = append(stale, idle[:i]...)
		if i == len(idle) {
			delete(b.hooks.idle, k)
			continue
		}
		b.hooks.idle[k] = idle[i:]
		if next.IsZero() || idle[i].idleSince.Before(next) {
			next = idle[i].idleSince
		}
	}
	b.hooks.expiry = nil
	if !next.IsZero() && !b.hooks.closed {
		b.hooks.expiry = time.AfterFunc(hookMaxIdle-time.Since(next), b.expireHooks)
	}
	b.mu.Unlock()
	for _, h := range stale {
		h.end()
	}
}

// remoteBuildEnded wakes the builds waiting for a machine.
func (b *Builder) remoteBuildEnded() {
	b.mu.Lock()
	defer b.mu.Unlock()
	close(b.hooks.wake)
	b.hooks.wake = make(chan struct{})
}

// Close ends the build hooks kept for later offers; a hook that a build
// under way gives back afterwards is ended then (see putHook).
func (b *Builder) Close() {
	b.mu.Lock()
	idle := b.hooks.idle
	b.hooks.idle = nil
	b.hooks.closed = true
	if b.hooks.expiry != nil {
		b.hooks.expiry.Stop()
		b.hooks.expiry = nil
	}
	b.mu.Unlock()
	for _, hs := range idle {
		for _, h := range hs {
			h.end()
		}
	}
}

// hookProgram returns the build hook and the name it is run under: the
// build-hook setting, or Nix's build-remote as the nix binary on PATH
// runs it (argv[0] "build-remote").
func (b *Builder) hookProgram() (path, argv0 string, err error) {
	path = b.cfg.BuildHook
	if path == "" {
		if path, err = exec.LookPath("nix"); err != nil {
			return "", "", fmt.Errorf("no build-hook set and no nix on PATH to run build-remote: %w", err)
		}
	}
	argv0 = filepath.Base(path)
	if argv0 == "nix" {
		argv0 = "build-remote"
	}
	return path, argv0, nil
}

// startHook starts the build hook and sends it settings.
func (b *Builder) startHook(key string, settings map[string]string) (*hookProc, error) {
	path, argv0, err := b.hookProgram()
	if err != nil {
		return nil, err
	}
	var files childFiles
	inR, inW, err := files.pipe()
	if err != nil {
		return nil, err
	}
	fromR, fromW, err := files.pipe()
	if err != nil {
		files.closeAll()
		return nil, err
	}
	logR, logW, err := files.pipe()
	if err != nil {
		files.closeAll()
		return nil, err
	}
	// The hook's copy of logR's descriptor: ExtraFiles would make logR
	// itself blocking, and then closing it would not end a read.
	var logRChild *os.File
	if raw, err := logR.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) {
			if nfd, err := unix.Dup(int(fd)); err == nil {
				logRChild = os.NewFile(uintptr(nfd), "build-hook-log")
			}
		})
	}
	if logRChild == nil {
		files.closeAll()
		return nil, errors.New("duplicating the build hook's log pipe")
	}
	files.add(logRChild)
	var cmd *exec.Cmd
	// ETXTBSY: a hook just written (a test's, say) may still be open for
	// writing in a child that another goroutine forked and has not yet
	// exec'd; that passes. (An exec.Cmd starts once: a new one per try.)
	for try := 0; ; try++ {
		cmd = &exec.Cmd{
			Path:   path,
			Args:   []string{argv0, strconv.Itoa(3)}, // Nix's verbosity lvlInfo
			Dir:    "/",
			Stdin:  inR,
			Stdout: fromW,
			Stderr: fromW,
			// fd 4: the remote builder's output; fd 5: its read side, from
			// which the hook reads ssh's complaints when it cannot connect.
			ExtraFiles:  []*os.File{nil, logW, logRChild},
			SysProcAttr: &syscall.SysProcAttr{Setsid: true},
		}
		if sock := b.cfg.HookSocket; sock != "" {
			for _, kv := range os.Environ() {
				if !strings.HasPrefix(kv, "NIX_DAEMON_SOCKET_PATH=") {
					cmd.Env = append(cmd.Env, kv)
				}
			}
			cmd.Env = append(cmd.Env, "NIX_DAEMON_SOCKET_PATH="+sock)
		}
		err = cmd.Start()
		if err == nil || !errors.Is(err, syscall.ETXTBSY) || try == 5 {
			break
		}
		time.Sleep(10 * time.Millisecond << try)
	}
	if err != nil {
		files.closeAll()
		return nil, fmt.Errorf("starting the build hook %s: %w", path, err)
	}
	inR.Close()
	fromW.Close()
	logW.Close()
	logRChild.Close()
	h := &hookProc{procGroup: procGroup{cmd: cmd}, key: key, enc: &hookWriter{w: bufio.NewWriter(inW)}, stdin: inW, from: bufio.NewReader(fromR), fromF: fromR, logR: logR}
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		h.enc.U64(1)
		h.enc.String(k)
		h.enc.String(settings[k])
	}
	h.enc.U64(0)
	if err := h.enc.Flush(); err != nil {
		h.end()
		return nil, fmt.Errorf("sending the build hook its settings: %w", err)
	}
	return h, nil
}

// end ends the hook and everything it started.
func (h *hookProc) end() {
	h.kill()
	h.stdin.Close()
	h.wait()
	h.fromF.Close()
	h.logR.Close()
}

// try offers g's build to the hook and returns its answer. The hook's
// log lines before it go to the callers. If ctx ends meanwhile, the hook
// is killed and err is set: it must not be kept.
func (h *hookProc) try(ctx context.Context, g *goal, willing bool, features []string) (reply hookReply, err error) {
	stop := context.AfterFunc(ctx, h.kill)
	defer func() {
		if !stop() && err == nil {
			err = context.Cause(ctx)
		}
	}()
	h.enc.String("try")
	h.enc.Bool(willing)
	h.enc.String(g.drv.Platform)
	h.enc.String(g.b.abs(g.drvPath))
	h.enc.StringSet(features)
	if err := h.enc.Flush(); err != nil {
		return 0, fmt.Errorf("offering a build to the build hook: %w", err)
	}
	for {
		line, err := h.from.ReadString('\n')
		if err != nil {
			return 0, fmt.Errorf("reading the build hook's answer: %w", err)
		}
		line = strings.TrimSuffix(line, "\n")
		reply, ok := strings.CutPrefix(line, "# ")
		if !ok {
			g.hookMessage(line, nil)
			continue
		}
		switch reply {
		case "accept":
			return hookAccept, nil
		case "decline":
			return hookDecline, nil
		case "decline-permanently":
			return hookDeclinePermanently, nil
		case "postpone":
			return hookPostpone, nil
		}
		return 0, fmt.Errorf("bad build hook reply '%s'", reply)
	}
}

// hookMessage handles a line of the hook's stderr: a JSON log message
// ("@nix {…}"), whose activities go to the callers and whose messages at
// warning level or above go to them as errors, or any other line, which
// goes to the daemon's log. A remote build's log lines (results of the
// remote build's activity) also go to j's log, when building.
func (g *goal) hookMessage(line string, j *job) {
	rest, ok := strings.CutPrefix(line, "@nix ")
	var msg struct {
		Action string `json:"action"`
		Level  int    `json:"level"`
		Msg    string `json:"msg"`
		ID     uint64 `json:"id"`
		Type   int    `json:"type"`
		Text   string `json:"text"`
		Fields []any  `json:"fields"`
	}
	dec := json.NewDecoder(strings.NewReader(rest))
	dec.UseNumber()
	if !ok || dec.Decode(&msg) != nil {
		g.b.log.Info("build hook", "drv", g.b.abs(g.drvPath), "line", line)
		return
	}
	drvAbs := g.b.abs(g.drvPath)
	switch msg.Action {
	case "msg":
		if msg.Level <= hookLvlWarn {
			g.each(func(c *call) { c.emit(func(p Progress) { p.Error(msg.Msg) }) })
		}
		return
	case "start", "stop", "result":
	default:
		return
	}
	ev := RemoteEvent{Action: msg.Action, ID: msg.ID, Level: msg.Level, Type: msg.Type, Text: msg.Text}
	for _, f := range msg.Fields {
		switch f := f.(type) {
		case string:
			ev.Fields = append(ev.Fields, f)
		case json.Number:
			n, err := strconv.ParseUint(string(f), 10, 64)
			if err != nil {
				return // not a field of Nix's logger
			}
			ev.Fields = append(ev.Fields, n)
		default:
			return // not a field of Nix's logger
		}
	}
	if ev.Action == "result" && ev.Type == hookResBuildLogLine && j != nil && len(ev.Fields) > 0 {
		if s, ok := ev.Fields[0].(string); ok {
			j.mu.Lock()
			io.WriteString(j.logFile, s+"\n")
			j.mu.Unlock()
		}
	}
	g.each(func(c *call) { c.emit(func(p Progress) { p.RemoteActivity(drvAbs, ev) }) })
}

// buildRemote runs the build the hook h accepted: it names the machine,
// gets the inputs and the outputs to bring back, and is waited for.
func (g *goal) buildRemote(ctx context.Context, h *hookProc, inputs []storepath.Path, outputs map[string]storepath.Path, missing []string) Result {
	b := g.b
	drvAbs := b.abs(g.drvPath)
	// Until the build runs: a hook that hangs must not hold the goal
	// past its end.
	stop := context.AfterFunc(ctx, h.kill)
	machine, err := h.from.ReadString('\n')
	if err == nil {
		g.machine = strings.TrimSuffix(machine, "\n")
		abs := make([]string, len(inputs))
		for i, p := range inputs {
			abs[i] = b.abs(p)
		}
		h.enc.StringSet(abs)
		h.enc.StringSet(missing)
		err = h.enc.Flush()
		h.stdin.Close()
	}
	if !stop() {
		h.end()
		return g.failf(MiscFailure, "building '%s': %v", drvAbs, context.Cause(ctx))
	}
	if err != nil {
		h.end()
		return g.failf(MiscFailure, "handing '%s' to the build hook: %v", drvAbs, err)
	}
	j := &job{g: g, drvAbs: drvAbs, outputs: outputs, remote: h}
	return j.build(ctx, outputs, nil, func() {})
}

// runRemote waits for the hook that builds j remotely, logging what the
// remote builder writes, as execute does for a local builder.
func (j *job) runRemote(ctx context.Context) (syscall.WaitStatus, error) {
	h := j.remote
	stop := context.AfterFunc(ctx, h.kill)
	defer stop()
	readDone := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	// The clients' limits, as for a local builder (see execute), kill the
	// hook, which ends the remote build.
	onData, stopWatch := j.watchLimits(true, func(msg string) {
		j.recordKill(TimedOut, msg)
		h.kill()
	})
	defer stopWatch()
	go func() { // ssh://: the builder's output, raw
		defer wg.Done()
		j.copyOutput(h.logR, &j.mu, onData, func(msg string) {
			j.recordKill(LogLimitExceeded, msg)
			h.kill()
		})
	}()
	go func() { // the hook's own messages, with ssh-ng://'s build log
		defer wg.Done()
		for {
			line, err := h.from.ReadString('\n')
			if line != "" {
				onData()
				j.g.hookMessage(strings.TrimSuffix(line, "\n"), j)
			}
			if err != nil {
				return
			}
		}
	}()
	go func() { wg.Wait(); close(readDone) }()
	werr := h.wait()
	awaitOutput(readDone, h.fromF, h.logR)
	h.fromF.Close()
	h.logR.Close()
	j.mu.Lock()
	defer j.mu.Unlock()
	if len(j.line) > 0 {
		j.flushLine()
	}
	var ee *exec.ExitError
	if werr != nil && !errors.As(werr, &ee) {
		return 0, fmt.Errorf("waiting for the build hook of '%s': %w", j.drvAbs, werr)
	}
	if ctx.Err() != nil && j.killMsg == "" {
		return 0, fmt.Errorf("building '%s': %w", j.drvAbs, context.Cause(ctx))
	}
	return h.cmd.ProcessState.Sys().(syscall.WaitStatus), nil
}

// checkRemoteOutputs checks that the hook made the outputs valid here.
func (j *job) checkRemoteOutputs(ctx context.Context) *failure {
	b := j.g.b
	for _, name := range slices.Sorted(maps.Keys(j.outputs)) {
		ok, err := b.st.IsValidPathFresh(ctx, j.outputs[name])
		if err != nil {
			return j.failf(MiscFailure, 1, "building '%s': %v", j.drvAbs, err)
		}
		if !ok {
			return j.failf(MiscFailure, 1, "some outputs of '%s' are not valid after its build on '%s'", j.drvAbs, j.g.machine)
		}
	}
	return nil
}

// hookWriter writes to the hook in the daemon protocol's encoding:
// little-endian 64-bit numbers, strings as a length and the bytes padded
// to 8, string sets sorted.
type hookWriter struct {
	w   *bufio.Writer
	err error
}

func (e *hookWriter) U64(v uint64) {
	if e.err == nil {
		_, e.err = e.w.Write(binary.LittleEndian.AppendUint64(nil, v))
	}
}

func (e *hookWriter) Bool(b bool) {
	if b {
		e.U64(1)
	} else {
		e.U64(0)
	}
}

func (e *hookWriter) String(s string) {
	e.U64(uint64(len(s)))
	if e.err == nil {
		_, e.err = e.w.WriteString(s + strings.Repeat("\x00", -len(s)&7))
	}
}

func (e *hookWriter) StringSet(ss []string) {
	ss = slices.Compact(slices.Sorted(slices.Values(ss)))
	e.U64(uint64(len(ss)))
	for _, s := range ss {
		e.String(s)
	}
}

func (e *hookWriter) Flush() error {
	if e.err == nil {
		e.err = e.w.Flush()
	}
	return e.err
}
