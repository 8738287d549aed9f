package main

import (
	"reflect"
	"testing"
	"time"
)

func TestParseDaemonArgs(t *testing.T) {
	o, err := parseDaemonArgs([]string{"--daemon", "--store", "/tmp/r", "--option", "trusted-users", "root ci", "--stdio", "--log-level=debug"})
	if err != nil {
		t.Fatal(err)
	}
	if o.root != "/tmp/r" || !o.stdio || !reflect.DeepEqual(o.overrides, [][2]string{{"trusted-users", "root ci"}}) || o.logLevel.String() != "DEBUG" {
		t.Errorf("parsed %+v", o)
	}
	for _, bad := range [][]string{{"--store"}, {"--option", "x"}, {"--bogus"}, {"--store", "https://cache"}, {"--log-level", "loud"}} {
		if _, err := parseDaemonArgs(bad); err == nil {
			t.Errorf("parseDaemonArgs(%q) succeeded", bad)
		}
	}
}

func TestParseLease(t *testing.T) {
	for in, want := range map[string]time.Duration{"6h": 6 * time.Hour, "90m": 90 * time.Minute, "3600": time.Hour} {
		if got, err := parseLease(in); err != nil || got != want {
			t.Errorf("parseLease(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "-1h", "soon", "12x"} {
		if _, err := parseLease(in); err == nil {
			t.Errorf("parseLease(%q) succeeded", in)
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
