package substitute

import "github.com/nixyard/nixyard/internal/nix/storepath"

type storepathT = storepath.Path

var storepathParseBase = storepath.ParseBase
