package realise

import (
	"context"
	"fmt"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// root makes paths temporary roots of the client's session, valid or not,
// as Nix's goals do for every path they are asked for (PathSubstitutionGoal
// and DerivationGoal call addTempRoot first): a client that asked for a
// path is about to use it, and for a CI job on a warm host these roots are
// what keeps a collection from deleting the paths it found already valid.
func (r *Realiser) root(ctx context.Context, paths ...storepath.Path) error {
	if r.session == nil {
		return nil
	}
	for _, p := range paths {
		if err := r.session.AddTempRoot(ctx, p); err != nil {
			return fmt.Errorf("adding a temporary root: %w", err)
		}
	}
	return nil
}
