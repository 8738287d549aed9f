package main

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/build"
	"github.com/nixyard/nixyard/internal/config"
	"github.com/nixyard/nixyard/internal/daemon"
)

func TestParseDaemonArgs(t *testing.T) {
	o, err := parseDaemonArgs([]string{"--daemon", "--store", "/tmp/r", "--option", "trusted-users", "root ci", "--stdio", "--log-level=debug"})
	if err != nil {
		t.Fatal(err)
	}
	if o.root != "/tmp/r" || !o.stdio || !reflect.DeepEqual(o.overrides, [][2]string{{"trusted-users", "root ci"}}) || o.logLevel.String() != "DEBUG" {
		t.Errorf("parsed %+v", o)
	}
	for _, bad := range [][]string{{"--store"}, {"--option", "x"}, {"--bogus"}, {"--store", "https://cache"}, {"--store", "local?root=/x"}, {"--store", "daemon"}, {"--log-level", "loud"}} {
		if _, err := parseDaemonArgs(bad); err == nil {
			t.Errorf("parseDaemonArgs(%q) succeeded", bad)
		}
	}
}

// TestParseDaemonArgsNix: the arguments nix-daemon takes as every Nix
// command does, so that a service that passes them starts nixyard too.
func TestParseDaemonArgsNix(t *testing.T) {
	o, err := parseDaemonArgs([]string{"--daemon", "-vv", "--log-format", "bar", "-j", "4", "--cores=2", "--no-sandbox",
		"--keep-outputs", "-K", "--relaxed-sandbox", "--no-gc-warning"})
	if err != nil {
		t.Fatal(err)
	}
	want := [][2]string{{"max-jobs", "4"}, {"cores", "2"}, {"sandbox", "false"}, {"keep-outputs", "true"}, {"keep-failed", "true"}, {"sandbox", "relaxed"}}
	if !reflect.DeepEqual(o.overrides, want) || o.logLevel != slog.LevelDebug {
		t.Errorf("parsed overrides %q, level %v; want %q, DEBUG", o.overrides, o.logLevel, want)
	}
	if o, err := parseDaemonArgs([]string{"--quiet", "--quiet", "--quiet"}); err != nil || o.logLevel != slog.LevelError {
		t.Errorf("--quiet thrice: %v, %v; want ERROR", o.logLevel, err)
	}
	if o, err := parseDaemonArgs([]string{"-v", "--log-level", "warn"}); err != nil || o.logLevel != slog.LevelWarn {
		t.Errorf("-v with --log-level warn: %v, %v; want WARN", o.logLevel, err)
	}
	for _, bad := range [][]string{{"--no-such-setting"}, {"--no-max-jobs"}, {"--sandbox=yes"}, {"--readonly-mode"}, {"-j"}} {
		if _, err := parseDaemonArgs(bad); err == nil {
			t.Errorf("parseDaemonArgs(%q) succeeded", bad)
		}
	}
}

func TestParseDaemonArgsListen(t *testing.T) {
	o, err := parseDaemonArgs([]string{"--listen", "/a,trusted=false", "--listen=/b,tenant=x"})
	if err != nil {
		t.Fatal(err)
	}
	if len(o.listens) != 2 || !o.listens[0].Policy.Untrusted || o.listens[1].Policy.Tenant != "x" {
		t.Fatalf("listens = %+v", o.listens)
	}
	if _, err := parseDaemonArgs([]string{"--listen", "/a,bogus=1"}); err == nil {
		t.Fatal("a bad --listen was accepted")
	}
}

// TestListenOwnSocket: a socket another daemon answers on is not taken
// over; closing a socket removes its file only if the file is still
// that socket's.
func TestListenOwnSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "socket")
	l1, err := listen(path, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := l1.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if l, err := listen(path, slog.New(slog.DiscardHandler)); err == nil {
		l.Close()
		t.Fatal("a second listen took over the socket of a daemon that answers")
	}
	// Another daemon made a socket there since (after the file was
	// removed): closing the first leaves it.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	l2, err := listen(path, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	l1.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Errorf("closing the first socket removed the second's file: %v", err)
	}
	l2.Close()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("closing the second socket left its file: %v", err)
	}
}

// TestListenAllTwice: a --listen on the default socket, or one given
// twice, is refused for what it is (the second listen would report a
// daemon already there: this one).
func TestListenAllTwice(t *testing.T) {
	t.Setenv("LISTEN_PID", "") // not socket-activated
	dir := t.TempDir()
	def := filepath.Join(dir, "default", "socket")
	job := filepath.Join(dir, "jobs", "socket")
	logger := slog.New(slog.DiscardHandler)
	for _, specs := range [][]daemon.ListenSpec{{{Path: def}}, {{Path: job}, {Path: job}}} {
		ls, err := listenAll(def, specs, logger)
		if err == nil || !strings.Contains(err.Error(), "listens there already") {
			t.Errorf("%v: %v", specs, err)
		}
		for _, l := range ls {
			l.Close()
		}
		if _, err := os.Lstat(def); !os.IsNotExist(err) {
			t.Errorf("%v: the default socket is left behind (%v)", specs, err)
		}
	}
}

// TestDefaultBuildUsers: with no build-users-group in nix.conf, a daemon
// on the host's store running as root takes nixbld when that group can
// serve, and none (with a warning) when it cannot.
func TestDefaultBuildUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the default applies to a daemon running as root")
	}
	var s config.Settings
	var log bytes.Buffer
	defaultBuildUsers(&s, slog.New(slog.NewTextHandler(&log, nil)))
	got, set := s.Lookup("build-users-group")
	if err := build.CheckBuildUsers("nixbld"); err == nil {
		if got != "nixbld" {
			t.Errorf("build-users-group = %q (set %v), want nixbld", got, set)
		}
	} else if set || !strings.Contains(log.String(), "builders run as root") {
		t.Errorf("nixbld cannot serve (%v): build-users-group = %q (set %v), log:\n%s", err, got, set, log.String())
	}
	var explicit config.Settings
	explicit.Set("build-users-group", "")
	defaultBuildUsers(&explicit, slog.New(slog.DiscardHandler))
	if got, _ := explicit.Lookup("build-users-group"); got != "" {
		t.Errorf("an explicit empty build-users-group became %q", got)
	}
}
