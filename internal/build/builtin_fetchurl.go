package build

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/substitute"
)

// builtinFetchurl is builtin:fetchurl, the builder of <nix/fetchurl.nix>:
// it downloads "url" to the output, as a file ("executable" = "1" makes it
// executable) or, with "unpack" = "1", as a NAR (xz-compressed when the
// URL ends in .xz). A flat fixed output is first asked of the
// hashed-mirrors, by its hash. As in Nix, TLS certificates are not
// verified: the output's hash is checked afterwards.
//
// The download itself runs in a process of its own (fetchMain), as the
// build user when there are build users, as Nix's builtin runs in its
// builder process: the host's firewall rules for build users apply to it
// (the cloud's metadata service, say), and what a server sends is parsed
// as that user, not as root. The daemon writes the output from what it
// hands over. It downloads only into fixed outputs (whose hash is
// checked; Nix runs other derivations of it too, in a sandbox without
// network) and only over http and https: a file:// URL would let any
// client read the daemon's files into the store.
func builtinFetchurl(ctx context.Context, j *job, v *storeView, warn func(string, ...any)) error {
	if kind, _ := j.g.drv.Kind(); kind != derivation.FixedOutput {
		return errors.New("builtin:fetchurl builds only fixed-output derivations in nixyard")
	}
	a, err := j.attrs("url", "outputHashMode")
	if err != nil {
		return err
	}
	mainURL, hashMode := a[0], a[1]
	o := j.g.drv.Outputs["out"]
	out, outHost, err := j.output(v)
	if err != nil {
		return err
	}
	env := j.g.drv.Env
	unpack := env["unpack"] == "1"
	executable := env["executable"] == "1"
	auth := readNetrc(j.g.b.cfg.NetrcFile)
	fetch := func(u string) error {
		if err := removeTree(outHost); err != nil {
			return err
		}
		if err := download(ctx, j.user, auth, u, func(body io.Reader) error {
			if !unpack {
				return writeNewFile(outHost, body)
			}
			if strings.HasSuffix(mainURL, ".xz") {
				xr, release, err := substitute.Decompressor("xz", body)
				if err != nil {
					return err
				}
				defer release()
				body = xr
			}
			return nar.Restore(ctx, body, outHost)
		}); err != nil {
			removeTree(outHost)
			return err
		}
		if executable {
			if err := os.Chmod(outHost, 0o755); err != nil {
				return fmt.Errorf("making '%s' executable: %w", out, err)
			}
		}
		return nil
	}
	if algo, err := hash.ParseAlgo(o.HashAlgo); hashMode == "flat" && err == nil {
		for _, m := range j.g.b.cfg.HashedMirrors {
			if !strings.HasSuffix(m, "/") {
				m += "/"
			}
			err := fetch(m + algo.String() + "/" + o.Hash)
			if err == nil {
				return nil
			}
			j.g.b.log.Debug("hashed mirror failed", "drv", j.drvAbs, "mirror", m, "err", err)
		}
	}
	return fetch(mainURL)
}

// stalledDownloadTimeout ends a download that receives nothing for that
// long (Nix's stalled-download-timeout default). A variable for tests.
var stalledDownloadTimeout = 300 * time.Second

// fetchArg0 is argv[0] of the fetcher process, which downloads for
// builtin:fetchurl (see builtinFetchurl).
const fetchArg0 = "nixyard-fetch"

// A binary that links this package (the daemon, its tests) is the fetcher
// when started with argv[0] fetchArg0: it becomes the build user it is
// told, downloads, and exits, before main runs.
func init() {
	if len(os.Args) > 0 && os.Args[0] == fetchArg0 {
		os.Exit(fetchMain(os.Stdin, os.Stdout, os.Stderr))
	}
}

// fetchRequest is what the daemon tells the fetcher, on its standard
// input (not its command line or environment, which others may read).
type fetchRequest struct {
	URL            string
	User, Password string // a login from netrc-file for the URL's host
	UID, GID       int    // the build user to become; 0: stay as started
	HeaderTimeout  time.Duration
	Daemon         int // the daemon's pid: the fetcher dies with it
}

// fetchMain is the fetcher: it GETs the request's URL and copies the body
// to out; a failure is told on errOut, in Nix's words, with status 1.
func fetchMain(in io.Reader, out, errOut io.Writer) int {
	var req fetchRequest
	fail := func(format string, args ...any) int {
		fmt.Fprintf(errOut, format+"\n", args...)
		return 1
	}
	if err := json.NewDecoder(in).Decode(&req); err != nil {
		return fail("fetcher: reading its request: %v", err)
	}
	if req.UID != 0 {
		// Go sets the ids of every thread of the process.
		if err := syscall.Setgroups(nil); err != nil {
			return fail("fetcher: dropping groups: %v", err)
		}
		if err := syscall.Setgid(req.GID); err != nil {
			return fail("fetcher: becoming group %d: %v", req.GID, err)
		}
		if err := syscall.Setuid(req.UID); err != nil {
			return fail("fetcher: becoming user %d: %v", req.UID, err)
		}
		// A change of user clears the death signal the daemon set: set
		// it again, then make sure the daemon did not die meanwhile.
		if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0, 0, 0); err != nil {
			return fail("fetcher: %v", err)
		}
		if os.Getppid() != req.Daemon {
			return fail("fetcher: the daemon is gone")
		}
	}
	client := &http.Client{Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		TLSClientConfig:       &tls.Config{InsecureSkipVerify: true}, // the hash is checked
		DisableKeepAlives:     true,                                  // one download
		ResponseHeaderTimeout: req.HeaderTimeout,
	}}
	hreq, err := http.NewRequest(http.MethodGet, req.URL, nil)
	if err != nil {
		return fail("unable to download '%s': %v", req.URL, err)
	}
	if req.User != "" || req.Password != "" {
		hreq.SetBasicAuth(req.User, req.Password)
	}
	resp, err := client.Do(hreq)
	if err != nil {
		return fail("unable to download '%s': %v", req.URL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		// As curl tells Nix: the code and the server's reason (not the
		// body, which Nix shows too: a server's page has no place in a
		// build log).
		if reason := strings.TrimSpace(strings.TrimPrefix(resp.Status, strconv.Itoa(resp.StatusCode))); reason != "" {
			return fail("unable to download '%s': HTTP error %d ('%s')", req.URL, resp.StatusCode, reason)
		}
		return fail("unable to download '%s': HTTP error %d", req.URL, resp.StatusCode)
	}
	if _, err := io.Copy(out, resp.Body); err != nil {
		return fail("unable to download '%s': %v", req.URL, err)
	}
	return 0
}

// proxyVars are the variables of the daemon's environment the fetcher
// gets: the proxies curl honours for Nix.
var proxyVars = []string{"http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy",
	"HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "ALL_PROXY", "NO_PROXY"}

// download fetches u in a fetcher process (as user, if not nil) and hands
// the body to use. A download that stalls for stalledDownloadTimeout
// fails.
func download(ctx context.Context, user *buildUser, auth netrc, u string, use func(io.Reader) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stalled := fmt.Errorf("unable to download '%s': no data for %v", u, stalledDownloadTimeout)
	watchdog := time.AfterFunc(stalledDownloadTimeout, func() { cancel(stalled) })
	defer watchdog.Stop()
	pu, err := url.Parse(u)
	if err != nil {
		return fmt.Errorf("unable to download '%s': %w", u, err)
	}
	if pu.Scheme != "http" && pu.Scheme != "https" {
		return fmt.Errorf("unable to download '%s': nixyard's builtin:fetchurl supports only http and https URLs", u)
	}
	req := fetchRequest{URL: u, HeaderTimeout: stalledDownloadTimeout, Daemon: os.Getpid()}
	if login, ok := auth.lookup(pu.Hostname()); ok {
		req.User, req.Password = login.user, login.password
	}
	if user != nil {
		req.UID, req.GID = user.uid, user.gid
	}
	reqData, err := json.Marshal(req)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "/proc/self/exe")
	cmd.Args = []string{fetchArg0}
	for _, k := range proxyVars {
		if v, ok := os.LookupEnv(k); ok {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
	}
	cmd.Stdin = bytes.NewReader(reqData)
	errOut := &cappedBuffer{max: 4 << 10}
	cmd.Stderr = errOut
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("unable to download '%s': starting the fetcher: %w", u, err)
	}
	body := &progressReader{r: stdout, progress: func() { watchdog.Reset(stalledDownloadTimeout) }}
	useErr := use(body)
	if useErr == nil {
		_, useErr = io.Copy(io.Discard, body) // what use left (a NAR's trailing bytes)
	}
	if useErr != nil {
		cmd.Process.Kill()
	}
	werr := cmd.Wait()
	switch {
	case context.Cause(ctx) == stalled:
		return stalled
	case werr != nil && errOut.Len() > 0:
		return errors.New(strings.TrimSpace(errOut.String())) // the fetcher's own failure
	case useErr != nil:
		return fmt.Errorf("unable to download '%s': %w", u, useErr)
	case werr != nil:
		return fmt.Errorf("unable to download '%s': the fetcher: %w", u, werr)
	}
	return nil
}

// progressReader calls progress after every read that returned data.
type progressReader struct {
	r        io.Reader
	progress func()
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.progress()
	}
	return n, err
}

// writeNewFile writes r to a new file at p.
func writeNewFile(p string, r io.Reader) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// netrc holds the logins of a netrc file, by machine; "" is the default.
type netrc map[string]netrcLogin

type netrcLogin struct{ user, password string }

func (n netrc) lookup(host string) (netrcLogin, bool) {
	if l, ok := n[host]; ok {
		return l, true
	}
	l, ok := n[""]
	return l, ok
}

// readNetrc reads the netrc file at p (nix.conf netrc-file) as curl does
// for Nix: "machine NAME", "default", "login USER", "password PASS"
// tokens; a missing or unreadable file means no logins.
func readNetrc(p string) netrc {
	n := netrc{}
	if p == "" {
		return n
	}
	data, err := os.ReadFile(p)
	if err != nil {
		return n
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Split(bufio.ScanWords)
	var machine string
	var inEntry bool
	var cur netrcLogin
	flush := func() {
		if inEntry {
			if _, dup := n[machine]; !dup {
				n[machine] = cur
			}
		}
	}
	for sc.Scan() {
		switch sc.Text() {
		case "machine":
			flush()
			sc.Scan()
			machine, inEntry, cur = sc.Text(), true, netrcLogin{}
		case "default":
			flush()
			machine, inEntry, cur = "", true, netrcLogin{}
		case "login":
			sc.Scan()
			cur.user = sc.Text()
		case "password":
			sc.Scan()
			cur.password = sc.Text()
		}
	}
	flush()
	return n
}
