package main

import (
	"reflect"
	"testing"
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
