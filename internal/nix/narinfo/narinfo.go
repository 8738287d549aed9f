// Package narinfo implements the text files of a Nix binary cache: the
// .narinfo describing one store path ("Key: value" lines, as Nix 2.8's
// NarInfo) and the cache's nix-cache-info.
package narinfo

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// MaxSize caps the size of a .narinfo Parse accepts. Real ones are a few
// hundred bytes plus about 45 bytes per reference and 100 per signature;
// 1 MiB allows over 20000 references, far beyond any real path.
const MaxSize = 1 << 20

// MaxCacheInfoSize caps nix-cache-info (three short lines in practice).
const MaxCacheInfoSize = 64 << 10

// ErrFormat is wrapped by every error about a malformed file.
var ErrFormat = errors.New("bad narinfo")

// DefaultCompression is the compression Nix assumes when a .narinfo has no
// Compression field.
const DefaultCompression = "bzip2"

// NarInfo is the content of a .narinfo.
type NarInfo struct {
	StorePath   storepath.Path
	URL         string // NAR location, relative to the cache (e.g. "nar/<filehash>.nar.xz")
	Compression string // "xz", "zstd", "bzip2", "br", "none", …; DefaultCompression if absent
	FileHash    hash.Hash
	FileSize    uint64
	NarHash     hash.Hash
	NarSize     uint64
	References  []storepath.Path // base names
	Deriver     storepath.Path   // zero when absent or "unknown-deriver"
	System      string
	Sigs        []string
	CA          contentaddress.CA
}

// fields that may appear at most once; Sig repeats.
var single = map[string]bool{
	"StorePath": true, "URL": true, "Compression": true, "FileHash": true,
	"FileSize": true, "NarHash": true, "NarSize": true, "References": true,
	"Deriver": true, "System": true, "CA": true,
}

// Parse parses a .narinfo whose StorePath lies in dir. Like Nix it ignores
// unknown fields and defaults Compression to bzip2; unlike Nix it refuses
// repeated fields, blank lines and a missing final newline, and checks
// every value it keeps.
func Parse(dir storepath.Dir, data []byte) (*NarInfo, error) {
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrFormat, len(data), MaxSize)
	}
	if len(data) == 0 || data[len(data)-1] != '\n' {
		return nil, fmt.Errorf("%w: does not end in a newline", ErrFormat)
	}
	ni := &NarInfo{}
	seen := map[string]bool{}
	lines := strings.Split(string(data[:len(data)-1]), "\n")
	for n, line := range lines {
		k, v, ok := strings.Cut(line, ": ")
		if !ok {
			return nil, fmt.Errorf("%w: line %d: no \": \" separator", ErrFormat, n+1)
		}
		if single[k] {
			if seen[k] {
				return nil, fmt.Errorf("%w: field %s: repeated", ErrFormat, k)
			}
			seen[k] = true
		}
		if err := ni.set(dir, k, v); err != nil {
			return nil, fmt.Errorf("%w: field %s: %w", ErrFormat, k, err)
		}
	}
	for _, k := range []string{"StorePath", "URL", "NarHash", "NarSize"} {
		if !seen[k] {
			return nil, fmt.Errorf("%w: field %s: missing", ErrFormat, k)
		}
	}
	if ni.Compression == "" {
		ni.Compression = DefaultCompression
	}
	return ni, nil
}

func (ni *NarInfo) set(dir storepath.Dir, k, v string) error {
	var err error
	switch k {
	case "StorePath":
		ni.StorePath, err = dir.Parse(v)
	case "URL":
		if v == "" {
			return errors.New("empty")
		}
		ni.URL = v
	case "Compression":
		if v == "" {
			return errors.New("empty")
		}
		ni.Compression = v
	case "FileHash":
		ni.FileHash, err = hash.Parse(v)
	case "FileSize":
		ni.FileSize, err = strconv.ParseUint(v, 10, 64)
	case "NarHash":
		ni.NarHash, err = hash.Parse(v)
		if err == nil && ni.NarHash.Algo != hash.SHA256 {
			err = fmt.Errorf("algorithm %s, want sha256", ni.NarHash.Algo)
		}
	case "NarSize":
		ni.NarSize, err = strconv.ParseUint(v, 10, 64)
		if err == nil && ni.NarSize == 0 {
			err = errors.New("zero")
		}
	case "References":
		if v == "" {
			return nil
		}
		for _, r := range strings.Split(v, " ") {
			p, err := storepath.ParseBase(r)
			if err != nil {
				return err
			}
			ni.References = append(ni.References, p)
		}
		if len(storepath.Sort(slices.Clone(ni.References))) != len(ni.References) {
			return errors.New("duplicate reference")
		}
	case "Deriver":
		if v != "unknown-deriver" {
			ni.Deriver, err = storepath.ParseBase(v)
		}
	case "System":
		ni.System = v
	case "Sig":
		if v == "" {
			return errors.New("empty")
		}
		if len(ni.Sigs) >= maxSigs {
			return fmt.Errorf("more than %d", maxSigs)
		}
		ni.Sigs = append(ni.Sigs, v)
	case "CA":
		if v != "" {
			ni.CA, err = contentaddress.Parse(v)
		}
	}
	return err
}

// maxSigs caps the Sig lines kept: a path is signed by one key per cache
// in practice; the cap keeps VerifyAny's work small.
const maxSigs = 64

// Marshal returns the .narinfo text as Nix's NarInfo::to_string writes it:
// hashes in nix base-32, references space-separated and sorted, signatures
// sorted and deduplicated. FileHash and FileSize are omitted when FileHash
// is zero, Deriver when zero, System and CA when empty.
func (ni *NarInfo) Marshal(dir storepath.Dir) []byte {
	var b bytes.Buffer
	line := func(k, v string) {
		b.WriteString(k)
		b.WriteString(": ")
		b.WriteString(v)
		b.WriteByte('\n')
	}
	line("StorePath", dir.Abs(ni.StorePath))
	line("URL", ni.URL)
	comp := ni.Compression
	if comp == "" {
		comp = DefaultCompression
	}
	line("Compression", comp)
	if !ni.FileHash.IsZero() {
		line("FileHash", ni.FileHash.String())
		line("FileSize", strconv.FormatUint(ni.FileSize, 10))
	}
	line("NarHash", ni.NarHash.String())
	line("NarSize", strconv.FormatUint(ni.NarSize, 10))
	refs := storepath.Sort(slices.Clone(ni.References))
	names := make([]string, len(refs))
	for i, r := range refs {
		names[i] = r.String()
	}
	line("References", strings.Join(names, " "))
	if !ni.Deriver.IsZero() {
		line("Deriver", ni.Deriver.String())
	}
	if ni.System != "" {
		line("System", ni.System)
	}
	sigs := slices.Clone(ni.Sigs)
	slices.Sort(sigs)
	for _, s := range slices.Compact(sigs) {
		line("Sig", s)
	}
	if !ni.CA.IsZero() {
		line("CA", ni.CA.String())
	}
	return b.Bytes()
}

// NixCacheInfo is the content of a binary cache's nix-cache-info.
type NixCacheInfo struct {
	StoreDir      string
	WantMassQuery bool
	Priority      int
	HasPriority   bool // Priority was given
}

// ParseNixCacheInfo parses nix-cache-info as Nix's BinaryCacheStore::init:
// "Key: value" lines with values trimmed, unknown keys and lines without a
// colon ignored, WantMassQuery true only for "1". A Priority that is not an
// integer and a missing StoreDir are errors.
func ParseNixCacheInfo(data []byte) (NixCacheInfo, error) {
	var ci NixCacheInfo
	if len(data) > MaxCacheInfoSize {
		return ci, fmt.Errorf("nix-cache-info: %d bytes, more than %d", len(data), MaxCacheInfoSize)
	}
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "StoreDir":
			ci.StoreDir = v
		case "WantMassQuery":
			ci.WantMassQuery = v == "1"
		case "Priority":
			p, err := strconv.ParseInt(v, 10, 32)
			if err != nil {
				return ci, fmt.Errorf("nix-cache-info: field Priority: %w", err)
			}
			ci.Priority, ci.HasPriority = int(p), true
		}
	}
	if ci.StoreDir == "" {
		return ci, errors.New("nix-cache-info: field StoreDir: missing")
	}
	return ci, nil
}

// Marshal returns nix-cache-info text.
func (ci NixCacheInfo) Marshal() []byte {
	var b strings.Builder
	b.WriteString("StoreDir: " + ci.StoreDir + "\n")
	if ci.WantMassQuery {
		b.WriteString("WantMassQuery: 1\n")
	}
	if ci.HasPriority {
		b.WriteString("Priority: " + strconv.Itoa(ci.Priority) + "\n")
	}
	return []byte(b.String())
}
