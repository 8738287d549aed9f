package daemon

import (
	"fmt"
	"sync"
)

// Activity and result types of the logger channel (§3.2 of
// worker-protocol.md).
const (
	actCopyPath  = 100
	actDownload  = 101
	actRealise   = 102
	actCopyPaths = 103
	actBuilds    = 104
	actBuild     = 105
	actPostBuild = 110 // actPostBuildHook

	resBuildLogLine     = 101
	resSetPhase         = 104
	resProgress         = 105
	resSetExpected      = 106
	resPostBuildLogLine = 107
)

// buildProgress turns the events of internal/build (build.Progress) into
// the logger messages a Nix 2.8 daemon sends while its Worker builds, as
// captured from a real 2.8 `nix-build` through nix-daemon:
//
//	START Realise(102), Builds(104), CopyPaths(103): level 0, empty text
//	on every change of the counters: RESULT Progress(105) on Builds and on
//	  CopyPaths, then SetExpected(106) [FileTransfer(101), 0] and
//	  [CopyPath(100), 0] on Realise
//	START Build(105), level Info, "building '<drv>'", [drv, "", 1, 1]
//	RESULT BuildLogLine(101) per line, SetPhase(104) per phase
//	STOP of the Build activity when the build ends
//	STOP CopyPaths, Builds, Realise (close)
//
// It is safe for concurrent use, as build.Progress requires.
type buildProgress struct {
	tun *tunnel

	mu                           sync.Mutex
	realise, builds, copyPaths   uint64
	acts                         map[string]uint64 // running builds: drv -> activity
	hooks                        map[string]uint64 // running post-build hooks: drv -> activity
	failures                     []buildFailure
	done, expected, run, nFailed int
	closed                       bool
}

// buildFailure is a build that failed while the client waited for it.
type buildFailure struct {
	drv string
	err error
}

// newBuildProgress starts the Worker's three activities.
func newBuildProgress(tun *tunnel) *buildProgress {
	p := &buildProgress{tun: tun, acts: map[string]uint64{}, hooks: map[string]uint64{}}
	p.realise = tun.StartActivity(lvlError, actRealise, "", nil, 0)
	p.builds = tun.StartActivity(lvlError, actBuilds, "", nil, 0)
	p.copyPaths = tun.StartActivity(lvlError, actCopyPaths, "", nil, 0)
	return p
}

// updateLocked sends the counters, as Nix's Worker::updateProgress.
func (p *buildProgress) updateLocked() {
	p.tun.Result(p.builds, resProgress, []field{p.done, p.expected, p.run, p.nFailed})
	p.tun.Result(p.copyPaths, resProgress, []field{0, 0, 0, 0})
	p.tun.Result(p.realise, resSetExpected, []field{actDownload, 0})
	p.tun.Result(p.realise, resSetExpected, []field{actCopyPath, 0})
}

// BuildsProgress implements build.Progress.
func (p *buildProgress) BuildsProgress(done, expected, running, failed int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || done == p.done && expected == p.expected && running == p.run && failed == p.nFailed {
		return
	}
	p.done, p.expected, p.run, p.nFailed = done, expected, running, failed
	p.updateLocked()
}

// BuildStarted implements build.Progress.
func (p *buildProgress) BuildStarted(drv string, check bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	if id, ok := p.acts[drv]; ok { // a second round (--check): a new activity
		p.tun.StopActivity(id)
	}
	text := fmt.Sprintf("building '%s'", drv)
	if check {
		text = fmt.Sprintf("checking outputs of '%s'", drv)
	}
	p.acts[drv] = p.tun.StartActivity(lvlInfo, actBuild, text, []field{drv, "", 1, 1}, 0)
}

// BuildLogLine implements build.Progress. A line outside a running build
// (such as "note: keeping build directory …") becomes a log message.
func (p *buildProgress) BuildLogLine(drv, line string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	if id, ok := p.acts[drv]; ok {
		p.tun.Result(id, resBuildLogLine, []field{line})
		return
	}
	p.tun.Log(lvlError, line)
}

// BuildPhase implements build.Progress.
func (p *buildProgress) BuildPhase(drv, phase string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if id, ok := p.acts[drv]; ok && !p.closed {
		p.tun.Result(id, resSetPhase, []field{phase})
	}
}

// BuildFinished implements build.Progress.
func (p *buildProgress) BuildFinished(drv string, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	if err != nil {
		p.failures = append(p.failures, buildFailure{drv: drv, err: err})
	}
	if id, ok := p.acts[drv]; ok {
		delete(p.acts, drv)
		p.tun.StopActivity(id)
	}
}

// PostBuildHookStarted implements build.Progress.
func (p *buildProgress) PostBuildHookStarted(drv, hook string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed {
		p.hooks[drv] = p.tun.StartActivity(lvlInfo, actPostBuild, fmt.Sprintf("running post-build-hook '%s'", hook), []field{drv}, 0)
	}
}

// PostBuildHookLine implements build.Progress.
func (p *buildProgress) PostBuildHookLine(drv, line string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if id, ok := p.hooks[drv]; ok && !p.closed {
		p.tun.Result(id, resPostBuildLogLine, []field{line})
	}
}

// PostBuildHookFinished implements build.Progress.
func (p *buildProgress) PostBuildHookFinished(drv string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if id, ok := p.hooks[drv]; ok && !p.closed {
		delete(p.hooks, drv)
		p.tun.StopActivity(id)
	}
}

// Error implements build.Progress: msg goes to the client at error level.
func (p *buildProgress) Error(msg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed {
		p.tun.Log(lvlError, msg)
	}
}

// logFailures logs the failed builds other than those in top, as Nix
// logs the error of a goal that others waited for (Goal::amDone) while
// the error of a requested goal becomes the op's error.
func (p *buildProgress) logFailures(top map[string]bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.failures {
		if !top[f.drv] {
			p.tun.Log(lvlError, "error: "+f.err.Error())
		}
	}
}

// close stops the activities still open, then the Worker's three, in
// the order Nix destroys them. Later events are dropped.
func (p *buildProgress) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.closed = true
	for _, m := range []map[string]uint64{p.hooks, p.acts} {
		for drv, id := range m {
			p.tun.StopActivity(id)
			delete(m, drv)
		}
	}
	p.tun.StopActivity(p.copyPaths)
	p.tun.StopActivity(p.builds)
	p.tun.StopActivity(p.realise)
}
