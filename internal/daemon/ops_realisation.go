package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/store"
)

// Realisations (§5.5): a client with the ca-derivations feature asks for
// the realisation of every derivation output it uses (QueryRealisation),
// and `nix copy` of such outputs registers them at the destination
// (RegisterDrvOutput). nixyard records one for every output of the
// derivations it builds or finds built (realise.RecordRealisations).

// parseDrvOutput parses a DrvOutput, "<algo>:<hash>!<output>", with the
// hash in any encoding, into the hash as the database keeps it
// ("sha256:<base16>") and the output name.
func parseDrvOutput(s string) (drvHash, output string, err error) {
	h, name, ok := strings.Cut(s, "!")
	if !ok || name == "" {
		return "", "", fmt.Errorf("invalid derivation output id '%s'", s)
	}
	parsed, err := hash.Parse(h)
	if err != nil {
		return "", "", fmt.Errorf("invalid derivation output id '%s': %w", s, err)
	}
	return parsed.StringBase16(), name, nil
}

// realisationJSON is r as the protocol sends a Realisation (§5.5), with
// signatures as strings, as pre-2.35 clients read them.
func realisationJSON(r store.Realisation) string {
	sigs := r.Signatures
	if sigs == nil {
		sigs = []string{}
	}
	js, _ := json.Marshal(struct {
		DependentRealisations map[string]string `json:"dependentRealisations"`
		ID                    string            `json:"id"`
		OutPath               string            `json:"outPath"`
		Signatures            []string          `json:"signatures"`
	}{map[string]string{}, r.ID(), r.Path.String(), sigs})
	return string(js)
}

func opQueryRealisationHandler(ctx context.Context, c *conn) error {
	id := c.in.String("drvOutput", wire.MaxSmallString)
	if err := c.begin(wire.OpQueryRealisation); err != nil {
		return err
	}
	drvHash, output, err := parseDrvOutput(id)
	if err != nil {
		return err
	}
	r, err := c.st.QueryRealisation(ctx, drvHash, output)
	if err != nil {
		return err
	}
	c.stopWork()
	// A set of at most one: before 1.31 the output path, then the
	// realisation, with the id as the client wrote it.
	if r == nil {
		c.out.U64(0)
		return nil
	}
	c.out.U64(1)
	if c.minor < 31 {
		c.out.String(c.dir.Abs(r.Path))
		return nil
	}
	r.DrvHash = strings.TrimSuffix(id, "!"+output)
	c.out.String(realisationJSON(*r))
	return nil
}

// opRegisterDrvOutputHandler records a realisation. Unlike nix-daemon,
// which takes one from any client, nixyard takes them from trusted clients
// only: a realisation of an input-addressed output cannot be checked, and
// it decides which path later clients get for that output.
func opRegisterDrvOutputHandler(ctx context.Context, c *conn) error {
	var id, outPath string
	var sigs []string
	if c.minor < 31 {
		id = c.in.String("drvOutput", wire.MaxSmallString)
		outPath = c.in.String("outPath", wire.MaxPathLen)
	} else {
		js := c.in.String("realisation", wire.MaxSmallString)
		if err := c.in.Err(); err == nil {
			var v struct {
				ID         *string  `json:"id"`
				OutPath    *string  `json:"outPath"`
				Signatures []string `json:"signatures"`
			}
			if err := json.Unmarshal([]byte(js), &v); err != nil || v.ID == nil || v.OutPath == nil {
				return fatal(fmt.Errorf("operation 'RegisterDrvOutput': invalid realisation %q", js))
			}
			id, outPath, sigs = *v.ID, *v.OutPath, v.Signatures
		}
	}
	if err := c.begin(wire.OpRegisterDrvOutput); err != nil {
		return err
	}
	if !c.peer.trusted {
		return c.untrusted("you are not privileged to register realisations")
	}
	drvHash, output, err := parseDrvOutput(id)
	if err != nil {
		return err
	}
	if !strings.HasPrefix(outPath, "/") {
		outPath = string(c.dir) + "/" + outPath
	}
	p, err := c.dir.Parse(outPath)
	if err != nil {
		return fmt.Errorf("realisation %s: %w", id, err)
	}
	if err := c.st.RegisterRealisation(ctx, store.Realisation{DrvHash: drvHash, Output: output, Path: p, Signatures: sigs}); err != nil {
		return err
	}
	c.stopWork()
	return nil
}
