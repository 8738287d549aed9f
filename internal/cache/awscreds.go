package cache

// AWS credentials for s3:// push targets, found where the AWS SDK that Nix
// uses finds them (its default chain), in the same order:
//
//  1. the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for
//     temporary credentials, AWS_SESSION_TOKEN;
//  2. a profile (AWS_PROFILE, else "default") in the shared credentials
//     file (AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials) or the
//     config file (AWS_CONFIG_FILE, else ~/.aws/config);
//  3. a container's role: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI (ECS) or
//     AWS_CONTAINER_CREDENTIALS_FULL_URI with
//     AWS_CONTAINER_AUTHORIZATION_TOKEN;
//  4. the instance's role, from the EC2 instance metadata service (IMDSv2,
//     falling back to v1), unless AWS_EC2_METADATA_DISABLED=true; its
//     address can be moved with AWS_EC2_METADATA_SERVICE_ENDPOINT.
//
// With the URL's profile=NAME, as with Nix, only that profile is read.
// Credentials that expire (3 and 4) are fetched again five minutes before
// they do; while that fails, it is tried again every 30 s (logged), and
// credentials that have not expired yet stay in use. Profiles that get
// their credentials elsewhere (role_arn, credential_process, SSO, web
// identity) are not supported and say so.

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// s3Creds are credentials to sign requests with.
type s3Creds struct {
	key, secret, token string
	expires            time.Time // zero for credentials that do not expire
}

// awsCredentials finds credentials and keeps them until shortly before
// they expire.
type awsCredentials struct {
	profile string // the URL's profile=, "" for the default chain
	client  *http.Client
	now     func() time.Time
	log     *slog.Logger

	mu      sync.Mutex
	cur     s3Creds
	source  string    // where cur came from, for the log
	lastTry time.Time // of a search that failed, else zero
	lastErr error
}

func newAWSCredentials(profile string, log *slog.Logger) *awsCredentials {
	d := &net.Dialer{Timeout: time.Second}
	tr := &http.Transport{DialContext: d.DialContext, Proxy: nil}
	return &awsCredentials{profile: profile, now: time.Now, log: log,
		client: &http.Client{Transport: tr, Timeout: 5 * time.Second,
			// A redirect would carry the metadata token elsewhere.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
}

const (
	// refreshBefore is how long before they expire credentials are renewed.
	refreshBefore = 5 * time.Minute
	// retryEvery spaces the searches for credentials after one failed.
	retryEvery = 30 * time.Second
)

// configError is a mistake in the configuration (a profile missing or of
// a kind not supported, no source at all), as opposed to a source that
// could not be reached.
type configError struct{ error }

func (e configError) Unwrap() error { return e.error }

// get returns credentials, finding new ones if there are none yet or
// those there are expire soon. While renewal fails, credentials that have
// not yet expired are used.
func (a *awsCredentials) get(ctx context.Context) (s3Creds, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	valid := a.cur.key != "" && (a.cur.expires.IsZero() || now.Before(a.cur.expires))
	if valid && (a.cur.expires.IsZero() || now.Before(a.cur.expires.Add(-refreshBefore))) {
		return a.cur, nil
	}
	if a.lastErr != nil && now.Sub(a.lastTry) < retryEvery {
		if valid {
			return a.cur, nil
		}
		return s3Creds{}, a.lastErr
	}
	c, source, err := a.find(ctx)
	if err != nil {
		a.lastTry, a.lastErr = now, fmt.Errorf("AWS credentials: %w", err)
		if valid {
			a.log.Warn("cannot renew AWS credentials; using those that expire soon", "from", a.source, "expires", a.cur.expires, "err", err)
			return a.cur, nil
		}
		return s3Creds{}, a.lastErr
	}
	if a.source != source {
		a.log.Info("using AWS credentials", "from", source)
	}
	a.cur, a.source, a.lastErr = c, source, nil
	return c, nil
}

// find walks the chain.
func (a *awsCredentials) find(ctx context.Context) (s3Creds, string, error) {
	if a.profile != "" {
		c, found, err := profileCreds(a.profile)
		if err == nil && !found {
			err = fmt.Errorf("no profile %q in %s or %s", a.profile, credentialsFile(), configFile())
		}
		if err != nil {
			return s3Creds{}, "", configError{err}
		}
		return c, "profile " + a.profile, nil
	}
	if k, s := os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY"); k != "" && s != "" {
		return s3Creds{key: k, secret: s, token: os.Getenv("AWS_SESSION_TOKEN")}, "the environment", nil
	}
	name := cmp.Or(os.Getenv("AWS_PROFILE"), os.Getenv("AWS_DEFAULT_PROFILE"), "default")
	if c, found, err := profileCreds(name); err != nil {
		return s3Creds{}, "", configError{err}
	} else if found {
		return c, "profile " + name, nil
	}
	if rel, full := os.Getenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"), os.Getenv("AWS_CONTAINER_CREDENTIALS_FULL_URI"); rel != "" || full != "" {
		c, err := a.containerCreds(ctx, rel, full)
		return c, "the container's role", err
	}
	if strings.EqualFold(os.Getenv("AWS_EC2_METADATA_DISABLED"), "true") {
		return s3Creds{}, "", configError{errors.New("none in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or in profile " + name + ", and instance metadata is disabled")}
	}
	c, err := a.instanceCreds(ctx)
	if err != nil {
		return s3Creds{}, "", fmt.Errorf("none in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or in profile %s, and from the instance metadata service: %w", name, err)
	}
	return c, "the instance's role", nil
}

// containerCreds fetches a container's role credentials from the ECS
// agent (rel, a path on its fixed address) or from full, which must be
// https or, as the AWS SDKs require, plain http to a loopback or ECS/EKS
// agent address; the authorization token comes from
// AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (EKS Pod Identity) or
// AWS_CONTAINER_AUTHORIZATION_TOKEN.
func (a *awsCredentials) containerCreds(ctx context.Context, rel, full string) (s3Creds, error) {
	u := full
	if rel != "" {
		u = "http://169.254.170.2" + rel
	} else if err := checkContainerURI(full); err != nil {
		return s3Creds{}, configError{err}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return s3Creds{}, configError{fmt.Errorf("container credentials: %w", err)}
	}
	if rel == "" {
		tok := os.Getenv("AWS_CONTAINER_AUTHORIZATION_TOKEN")
		if f := os.Getenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"); f != "" {
			b, err := os.ReadFile(f)
			if err != nil {
				return s3Creds{}, configError{fmt.Errorf("container credentials: %w", err)}
			}
			tok = strings.TrimSpace(string(b))
		}
		if tok != "" {
			req.Header.Set("Authorization", tok)
		}
	}
	c, err := a.fetchJSON(req)
	if err != nil {
		return s3Creds{}, fmt.Errorf("container credentials from %s: %w", req.URL.Redacted(), err)
	}
	return c, nil
}

// checkContainerURI refuses an AWS_CONTAINER_CREDENTIALS_FULL_URI that
// would send the authorization token in clear to another host.
func checkContainerURI(full string) error {
	u, err := url.Parse(full)
	if err != nil {
		return fmt.Errorf("AWS_CONTAINER_CREDENTIALS_FULL_URI: %w", err)
	}
	if u.Scheme == "https" {
		return nil
	}
	if u.Scheme == "http" {
		host := u.Hostname()
		if host == "localhost" || host == "169.254.170.2" || host == "169.254.170.23" || host == "fd00:ec2::23" {
			return nil
		}
		if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
			return nil
		}
	}
	return fmt.Errorf("AWS_CONTAINER_CREDENTIALS_FULL_URI %q: want https, or http to a loopback or ECS/EKS agent address", full)
}

// instanceCreds asks the EC2 instance metadata service for the
// credentials of the instance's role.
func (a *awsCredentials) instanceCreds(ctx context.Context) (s3Creds, error) {
	base := strings.TrimSuffix(cmp.Or(os.Getenv("AWS_EC2_METADATA_SERVICE_ENDPOINT"), "http://169.254.169.254"), "/")
	token, err := a.imdsToken(ctx, base)
	if err != nil {
		return s3Creds{}, err
	}
	get := func(path string) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
		if err == nil && token != "" {
			req.Header.Set("X-Aws-Ec2-Metadata-Token", token)
		}
		return req, err
	}
	const credsPath = "/latest/meta-data/iam/security-credentials/"
	req, err := get(credsPath)
	if err != nil {
		return s3Creds{}, err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return s3Creds{}, err
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	resp.Body.Close()
	role, _, _ := strings.Cut(strings.TrimSpace(string(body)), "\n")
	if resp.StatusCode != http.StatusOK || role == "" {
		return s3Creds{}, fmt.Errorf("GET %s%s: %s (does the instance have a role?)", base, credsPath, resp.Status)
	}
	if req, err = get(credsPath + role); err != nil {
		return s3Creds{}, err
	}
	return a.fetchJSON(req)
}

// imdsToken asks for an IMDSv2 session token. As the AWS SDK does, any
// failure but a 400 falls back to IMDSv1 (no token): a service without
// v2, or a container one hop too far for the token's answer to reach
// (its default hop limit is 1), whose v1 requests may still work.
func (a *awsCredentials) imdsToken(ctx context.Context, base string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, imdsTokenTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, base+"/latest/api/token", nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", "21600")
	resp, err := a.client.Do(req)
	if err != nil {
		return "", nil
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		return string(body), nil
	case http.StatusBadRequest:
		return "", fmt.Errorf("PUT %s/latest/api/token: %s", base, resp.Status)
	}
	return "", nil
}

// imdsTokenTimeout bounds the wait for an IMDSv2 token, whose answer
// never comes back to a container behind one hop too many.
const imdsTokenTimeout = 2 * time.Second

// fetchJSON reads credentials in the JSON the metadata services answer.
func (a *awsCredentials) fetchJSON(req *http.Request) (s3Creds, error) {
	resp, err := a.client.Do(req)
	if err != nil {
		return s3Creds{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s3Creds{}, fmt.Errorf("GET %s: %s", req.URL.Redacted(), resp.Status)
	}
	var v struct {
		AccessKeyID     string `json:"AccessKeyId"`
		SecretAccessKey string
		Token           string
		Expiration      time.Time
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&v); err != nil {
		return s3Creds{}, fmt.Errorf("GET %s: %w", req.URL.Redacted(), err)
	}
	if v.AccessKeyID == "" || v.SecretAccessKey == "" {
		return s3Creds{}, fmt.Errorf("GET %s: no AccessKeyId or SecretAccessKey", req.URL.Redacted())
	}
	return s3Creds{key: v.AccessKeyID, secret: v.SecretAccessKey, token: v.Token, expires: v.Expiration}, nil
}

func credentialsFile() string {
	return cmp.Or(os.Getenv("AWS_SHARED_CREDENTIALS_FILE"), filepath.Join(homeDir(), ".aws", "credentials"))
}

func configFile() string {
	return cmp.Or(os.Getenv("AWS_CONFIG_FILE"), filepath.Join(homeDir(), ".aws", "config"))
}

func homeDir() string {
	h, _ := os.UserHomeDir()
	return h
}

// profileCreds reads a profile's keys from the shared credentials file,
// then the config file (where a profile's section is "[profile NAME]",
// but "[default]"). found is false if neither has the profile.
func profileCreds(name string) (c s3Creds, found bool, err error) {
	configSection := "profile " + name
	if name == "default" {
		configSection = name
	}
	for _, f := range []struct{ path, section string }{{credentialsFile(), name}, {configFile(), configSection}} {
		kv, ok, err := iniSection(f.path, f.section)
		if err != nil {
			return s3Creds{}, false, err
		}
		if !ok {
			continue
		}
		found = true
		if kv["aws_access_key_id"] != "" && kv["aws_secret_access_key"] != "" {
			return s3Creds{key: kv["aws_access_key_id"], secret: kv["aws_secret_access_key"], token: kv["aws_session_token"]}, true, nil
		}
		for _, k := range []string{"role_arn", "credential_process", "sso_session", "sso_start_url", "web_identity_token_file"} {
			if kv[k] != "" {
				return s3Creds{}, true, fmt.Errorf("profile %s in %s: %s is not supported; give the profile aws_access_key_id and aws_secret_access_key, or use the environment", name, f.path, k)
			}
		}
	}
	if found {
		return s3Creds{}, true, fmt.Errorf("profile %s has no aws_access_key_id and aws_secret_access_key", name)
	}
	return s3Creds{}, false, nil
}

// iniSection returns the keys of one section of an AWS-style INI file; a
// missing file has no sections.
func iniSection(path, section string) (map[string]string, bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("AWS profiles: %w", err)
	}
	defer f.Close()
	var kv map[string]string
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && line[len(line)-1] == ']':
			in = strings.TrimSpace(line[1:len(line)-1]) == section
			if in && kv == nil {
				kv = map[string]string{}
			}
		case in:
			if k, v, ok := strings.Cut(line, "="); ok {
				kv[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, false, fmt.Errorf("AWS profiles: %s: %w", path, err)
	}
	return kv, kv != nil, nil
}
