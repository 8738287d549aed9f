package store

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixyard/nixyard/internal/nix/signature"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

func TestSignatureCheck(t *testing.T) {
	sk := signature.SecretKey{Name: "test-1", Key: ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))}
	root := t.TempDir()
	s, err := Open(context.Background(), Config{
		RealStoreDir:      filepath.Join(root, "nix/store"),
		StateDir:          filepath.Join(root, "nix/var/nix"),
		LogDir:            filepath.Join(root, "nix/var/log/nix"),
		TrustedPublicKeys: []string{sk.PublicKey().String()},
		RequireSigs:       true,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	data := narOf(t, map[string]string{"f": "signed"})
	info := caNARInfo(t, s, "ia", data, nil)
	info.CA = ""
	info.Path, _ = storepath.ParseBase("44444444444444444444444444444444-ia")
	fp := signature.Fingerprint(s.Dir(), info.Path, info.NarHash, info.NarSize, info.References)
	info.Sigs = []string{"test-1:" + strings.Repeat("A", 86) + "=="}
	if err := s.AddToStoreNar(ctx, info, bytes.NewReader(data), AddOptions{CheckSigs: true}); err == nil || !strings.Contains(err.Error(), "lacks a valid signature") {
		t.Fatalf("bad signature: %v", err)
	}
	assertNothing(t, s, info.Path)
	info.Sigs = []string{sk.Sign(fp)}
	if err := s.AddToStoreNar(ctx, info, bytes.NewReader(data), AddOptions{CheckSigs: true}); err != nil {
		t.Fatal(err)
	}
}
