package substitute

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"

	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// maxNarinfoSize caps the bytes read for one .narinfo. Real narinfos are a
// few hundred bytes plus ~45 bytes per reference; 1 MiB allows over 20000
// references, far beyond any real path.
const maxNarinfoSize = 1 << 20

// maxCacheInfoSize caps the bytes read for nix-cache-info (three short lines
// in practice).
const maxCacheInfoSize = 64 << 10

// Info is what an upstream says about a store path: its narinfo, and the
// upstream it came from. An Info is immutable once returned.
type Info struct {
	Path        storepath.Path
	URL         string // NAR URL as written in the narinfo (relative to the upstream)
	Compression string // "none", "xz", "zstd", "bzip2", "br"
	FileHash    hash.Hash
	FileSize    uint64 // 0 if unknown
	NarHash     hash.Hash
	NarSize     uint64
	References  []storepath.Path
	Deriver     storepath.Path // zero if unknown
	Sigs        []string
	CA          string

	// Upstream is the base URL of the upstream that served this narinfo.
	Upstream string
}

// cacheInfo is the content of nix-cache-info.
type cacheInfo struct {
	StoreDir      string
	WantMassQuery bool
	Priority      int
	hasPriority   bool
}

func parseCacheInfo(data []byte) (cacheInfo, error) {
	var ci cacheInfo
	for n, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			return ci, fmt.Errorf("nix-cache-info line %d: no colon", n+1)
		}
		v = strings.TrimSpace(v)
		switch k {
		case "StoreDir":
			ci.StoreDir = v
		case "WantMassQuery":
			ci.WantMassQuery = v == "1"
		case "Priority":
			p, err := strconv.Atoi(v)
			if err != nil {
				return ci, fmt.Errorf("nix-cache-info field Priority: %w", err)
			}
			ci.Priority, ci.hasPriority = p, true
		}
	}
	return ci, nil
}

// parseNarinfo parses a .narinfo as Nix's NarInfo constructor does:
// "Key: value" lines, unknown keys ignored, Compression bzip2 if omitted.
// dir is the store directory StorePath must lie in.
func parseNarinfo(data []byte, dir storepath.Dir) (*Info, error) {
	info := &Info{}
	var haveNarHash, haveNarSize bool
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), maxNarinfoSize)
	n := 0
	for sc.Scan() {
		n++
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			continue
		}
		k, v, ok := strings.Cut(line, ": ")
		if !ok {
			return nil, fmt.Errorf("narinfo line %d: no \": \" separator", n)
		}
		var err error
		switch k {
		case "StorePath":
			info.Path, err = dir.Parse(v)
		case "URL":
			if v == "" {
				err = fmt.Errorf("empty")
			}
			info.URL = v
		case "Compression":
			info.Compression = v
		case "FileHash":
			info.FileHash, err = hash.Parse(v)
		case "FileSize":
			info.FileSize, err = strconv.ParseUint(v, 10, 64)
		case "NarHash":
			info.NarHash, err = hash.Parse(v)
			if err == nil && info.NarHash.Algo != hash.SHA256 {
				err = fmt.Errorf("algorithm %s, want sha256", info.NarHash.Algo)
			}
			haveNarHash = true
		case "NarSize":
			info.NarSize, err = strconv.ParseUint(v, 10, 64)
			haveNarSize = true
		case "References":
			for _, f := range strings.Fields(v) {
				p, perr := storepath.ParseBase(f)
				if perr != nil {
					err = perr
					break
				}
				info.References = append(info.References, p)
			}
		case "Deriver":
			if v != "unknown-deriver" {
				info.Deriver, err = storepath.ParseBase(v)
			}
		case "Sig":
			info.Sigs = append(info.Sigs, v)
		case "CA":
			if _, err = contentaddress.Parse(v); err == nil {
				info.CA = v
			}
		}
		if err != nil {
			return nil, fmt.Errorf("narinfo field %s: %w", k, err)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("narinfo: %w", err)
	}
	switch {
	case info.Path.IsZero():
		return nil, fmt.Errorf("narinfo: field StorePath missing")
	case info.URL == "":
		return nil, fmt.Errorf("narinfo: field URL missing")
	case !haveNarHash:
		return nil, fmt.Errorf("narinfo: field NarHash missing")
	case !haveNarSize || info.NarSize == 0:
		return nil, fmt.Errorf("narinfo: field NarSize missing or zero")
	}
	if info.Compression == "" {
		info.Compression = "bzip2"
	}
	return info, nil
}
