package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// caSchemaVersion is the version of Nix's schema for content-addressed
// derivations (src/libstore/ca-specific-schema.sql) that nixyard writes,
// as Nix 2.8 does: db/ca-schema holds it.
const caSchemaVersion = 3

// caSchema creates the tables of that schema, as Nix 2.8 does on a store
// without them when ca-derivations is enabled. Realisations.drvPath holds
// the derivation's hash modulo ("sha256:<base16>"), not a path.
const caSchema = `
create table if not exists Realisations (
    id integer primary key autoincrement not null,
    drvPath text not null,
    outputName text not null,
    outputPath integer not null,
    signatures text,
    foreign key (outputPath) references ValidPaths(id) on delete cascade
);
create index if not exists IndexRealisations on Realisations(drvPath, outputName);
create table if not exists RealisationsRefs (
    referrer integer not null,
    realisationReference integer,
    foreign key (referrer) references Realisations(id) on delete cascade,
    foreign key (realisationReference) references Realisations(id) on delete restrict
);
create index if not exists IndexRealisationsRefs on RealisationsRefs(referrer);
create index if not exists IndexRealisationsRefsOnOutputPath on Realisations(outputPath);
`

// Realisation says which path an output of a derivation was realised as
// (Nix's Realisation, for clients with the ca-derivations feature, which
// ask for one for every output they built, input-addressed or not).
type Realisation struct {
	DrvHash    string // the derivation's hash modulo, "sha256:<base16>"
	Output     string // the output's name
	Path       storepath.Path
	Signatures []string
}

// ID is the realisation's DrvOutput: "<DrvHash>!<Output>".
func (r Realisation) ID() string { return r.DrvHash + "!" + r.Output }

// ensureCASchema creates the realisation tables and db/ca-schema once, as
// Nix 2.8 does when ca-derivations is first enabled on a store. A store
// whose ca-schema is of another version is left alone, and realisations
// are then refused.
func (s *Store) ensureCASchema(ctx context.Context) error {
	s.caSchemaMu.Lock()
	defer s.caSchemaMu.Unlock()
	if s.caSchemaOK {
		return nil
	}
	path := filepath.Join(s.cfg.StateDir, "db", "ca-schema")
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := s.db.write(ctx, nil, func(tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, caSchema)
			return err
		}); err != nil {
			return fmt.Errorf("store: creating the schema of realisations: %w", err)
		}
		if err := writeFileSync(path, []byte(strconv.Itoa(caSchemaVersion)), 0o666); err != nil {
			return err
		}
	case err != nil:
		return fmt.Errorf("store: reading %s: %w", path, err)
	default:
		if v, err := strconv.Atoi(strings.TrimSpace(string(data))); err != nil || v != caSchemaVersion {
			return fmt.Errorf("store: %s: the schema of realisations is version %q, but only version %d is supported", path, strings.TrimSpace(string(data)), caSchemaVersion)
		}
	}
	s.caSchemaOK = true
	return nil
}

// RegisterRealisation records r. Its path must be valid. A realisation of
// the same output already recorded must name the same path (it then gains
// r's signatures); another path is an error, as in Nix.
func (s *Store) RegisterRealisation(ctx context.Context, r Realisation) error {
	if err := s.ensureCASchema(ctx); err != nil {
		return err
	}
	abs := s.abs(r.Path)
	err := s.db.write(ctx, nil, func(tx *sql.Tx) error {
		var pathID int64
		if err := tx.QueryRowContext(ctx, "select id from ValidPaths where path = ?", abs).Scan(&pathID); errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("path '%s' is not valid", abs)
		} else if err != nil {
			return err
		}
		var (
			id      int64
			oldPath string
			oldSigs sql.NullString
		)
		err := tx.QueryRowContext(ctx, "select r.id, v.path, r.signatures from Realisations r join ValidPaths v on v.id = r.outputPath where r.drvPath = ? and r.outputName = ?",
			r.DrvHash, r.Output).Scan(&id, &oldPath, &oldSigs)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			_, err = tx.ExecContext(ctx, "insert into Realisations (drvPath, outputName, outputPath, signatures) values (?, ?, ?, ?)",
				r.DrvHash, r.Output, pathID, strings.Join(r.Signatures, " "))
			return err
		case err != nil:
			return err
		case oldPath != abs:
			return fmt.Errorf("trying to register a realisation of '%s', but we already have another one locally.\nLocal:  %s\nRemote: %s", r.ID(), oldPath, abs)
		}
		sigs := strings.Fields(oldSigs.String)
		for _, sig := range r.Signatures {
			if !slices.Contains(sigs, sig) {
				sigs = append(sigs, sig)
			}
		}
		_, err = tx.ExecContext(ctx, "update Realisations set signatures = ? where id = ?", strings.Join(sigs, " "), id)
		return err
	})
	if err != nil {
		return fmt.Errorf("store: registering the realisation %s: %w", r.ID(), err)
	}
	return nil
}

// QueryRealisation returns the realisation of output of the derivation
// whose hash modulo is drvHash, or nil if none is recorded.
func (s *Store) QueryRealisation(ctx context.Context, drvHash, output string) (*Realisation, error) {
	if err := s.ensureCASchema(ctx); err != nil {
		return nil, err
	}
	var (
		abs  string
		sigs sql.NullString
	)
	err := s.db.r.QueryRowContext(ctx, "select v.path, r.signatures from Realisations r join ValidPaths v on v.id = r.outputPath where r.drvPath = ? and r.outputName = ?",
		drvHash, output).Scan(&abs, &sigs)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("store: querying the realisation %s!%s: %w", drvHash, output, err)
	}
	p, err := s.parseDBPath(abs)
	if err != nil {
		return nil, err
	}
	return &Realisation{DrvHash: drvHash, Output: output, Path: p, Signatures: strings.Fields(sigs.String)}, nil
}
