package daemon

import "testing"

func TestParseListenSpec(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    ListenSpec
		wantErr bool
	}{
		// The tenant is the socket's path unless named.
		{in: "/run/j.sock", want: ListenSpec{Path: "/run/j.sock", Policy: ListenPolicy{Untrusted: true, Tenant: "/run/j.sock", MaxConns: DefaultListenMaxConns}}},
		{in: "/run/j.sock,trusted=false", want: ListenSpec{Path: "/run/j.sock", Policy: ListenPolicy{Untrusted: true, Tenant: "/run/j.sock", MaxConns: DefaultListenMaxConns}}},
		{in: "/run/j.sock,trusted=false,tenant=gitlab", want: ListenSpec{Path: "/run/j.sock", Policy: ListenPolicy{Untrusted: true, Tenant: "gitlab", MaxConns: DefaultListenMaxConns}}},
		{in: "/run/j.sock,tenant=ci,trusted=users", want: ListenSpec{Path: "/run/j.sock", Policy: ListenPolicy{Tenant: "ci", MaxConns: DefaultListenMaxConns}}},
		{in: "/s,trusted=true", wantErr: true}, // ambiguous: users, or everyone?
		{in: "/s,max-connections=8", want: ListenSpec{Path: "/s", Policy: ListenPolicy{Untrusted: true, Tenant: "/s", MaxConns: 8}}},
		{in: "/s,max-connections=0", wantErr: true},
		{in: ",trusted=false", wantErr: true},
		{in: "run/j.sock", wantErr: true}, // relative
		{in: "/s,trusted=maybe", wantErr: true},
		{in: "/s,tenant=", wantErr: true},
		{in: "/s,owner=me", wantErr: true},
		{in: "/s,untrusted", wantErr: true},
	} {
		got, err := ParseListenSpec(tc.in)
		if (err != nil) != tc.wantErr {
			t.Errorf("ParseListenSpec(%q) error = %v, want error %v", tc.in, err, tc.wantErr)
			continue
		}
		if err == nil && got != tc.want {
			t.Errorf("ParseListenSpec(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}
