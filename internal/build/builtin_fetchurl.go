package build

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

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
// nixyard runs it in the daemon, so it downloads only into fixed outputs
// (whose hash is checked; Nix runs other derivations of it too, in a
// sandbox without network) and only over http and https: a file:// URL
// would let any client read the daemon's files into the store.
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
	client := &http.Client{Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		TLSClientConfig:       &tls.Config{InsecureSkipVerify: true}, // the hash is checked
		DisableKeepAlives:     true,                                  // one download per build
		ResponseHeaderTimeout: stalledDownloadTimeout,
	}}
	fetch := func(u string) error {
		if err := removeTree(outHost); err != nil {
			return err
		}
		if err := download(ctx, client, auth, u, func(body io.Reader) error {
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

// download GETs u and hands the body to use. A download that stalls for
// stalledDownloadTimeout fails.
func download(ctx context.Context, client *http.Client, auth netrc, u string, use func(io.Reader) error) error {
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
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("unable to download '%s': %w", u, err)
	}
	if login, ok := auth.lookup(pu.Hostname()); ok {
		req.SetBasicAuth(login.user, login.password)
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("unable to download '%s': %w", u, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("unable to download '%s': HTTP error %d", u, resp.StatusCode)
	}
	body := &progressReader{r: resp.Body, progress: func() { watchdog.Reset(stalledDownloadTimeout) }}
	if err := use(body); err != nil {
		if cause := context.Cause(ctx); cause == stalled {
			return stalled
		}
		return fmt.Errorf("unable to download '%s': %w", u, err)
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
