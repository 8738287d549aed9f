package daemon

import (
	"context"

	"github.com/nixyard/nixyard/internal/daemon/wire"
)

// handler serves one op on c: it reads the op's arguments, starts the
// work phase (begin), does the op, and ends the work phase (stopWork)
// before it writes its reply. An error it returns is sent to the client
// by finishOp.
type handler func(ctx context.Context, c *conn) error

// handlers maps op numbers to their handlers, which are in the ops_*.go
// files (SetOptions in settings.go). An op missing here is refused (see
// perform); every op, removed ones too, has a name in opNames
// (protocol.go).
var handlers = map[uint64]handler{
	wire.OpIsValidPath:                 opIsValidPathHandler,
	wire.OpHasSubstitutes:              opHasSubstitutesHandler,
	wire.OpQueryPathHash:               opQueryPathHashHandler,
	wire.OpQueryReferences:             opQueryReferencesHandler,
	wire.OpQueryReferrers:              opQueryReferrersHandler,
	wire.OpAddToStore:                  opAddToStoreHandler,
	wire.OpAddTextToStore:              opAddTextToStoreHandler,
	wire.OpBuildPaths:                  opBuildPathsHandler,
	wire.OpEnsurePath:                  opEnsurePathHandler,
	wire.OpAddTempRoot:                 opAddTempRootHandler,
	wire.OpAddIndirectRoot:             opAddIndirectRootHandler,
	wire.OpSyncWithGC:                  opSyncWithGCHandler,
	wire.OpFindRoots:                   opFindRootsHandler,
	wire.OpExportPath:                  opExportPathHandler,
	wire.OpQueryDeriver:                opQueryDeriverHandler,
	wire.OpSetOptions:                  opSetOptionsHandler,
	wire.OpCollectGarbage:              opCollectGarbageHandler,
	wire.OpQuerySubstitutablePathInfo:  opQuerySubstitutablePathInfoHandler,
	wire.OpQueryDerivationOutputs:      opQueryDerivationOutputsHandler,
	wire.OpQueryAllValidPaths:          opQueryAllValidPathsHandler,
	wire.OpQueryPathInfo:               opQueryPathInfoHandler,
	wire.OpImportPaths:                 opImportPathsHandler,
	wire.OpQueryDerivationOutputNames:  opQueryDerivationOutputNamesHandler,
	wire.OpQueryPathFromHashPart:       opQueryPathFromHashPartHandler,
	wire.OpQuerySubstitutablePathInfos: opQuerySubstitutablePathInfosHandler,
	wire.OpQueryValidPaths:             opQueryValidPathsHandler,
	wire.OpQuerySubstitutablePaths:     opQuerySubstitutablePathsHandler,
	wire.OpQueryValidDerivers:          opQueryValidDeriversHandler,
	wire.OpOptimiseStore:               opOptimiseStoreHandler,
	wire.OpVerifyStore:                 opVerifyStoreHandler,
	wire.OpAddSignatures:               opAddSignaturesHandler,
	wire.OpNarFromPath:                 opNarFromPathHandler,
	wire.OpAddToStoreNar:               opAddToStoreNarHandler,
	wire.OpQueryMissing:                opQueryMissingHandler,
	wire.OpQueryDerivationOutputMap:    opQueryDerivationOutputMapHandler,
	wire.OpAddMultipleToStore:          opAddMultipleToStoreHandler,
	wire.OpAddBuildLog:                 opAddBuildLogHandler,
	wire.OpBuildPathsWithResults:       opBuildPathsWithResultsHandler,
	wire.OpBuildDerivation:             opBuildDerivationHandler,
	wire.OpAddPermRoot:                 opAddPermRootHandler,
	wire.OpQueryRealisation:            opQueryRealisationHandler,
	wire.OpRegisterDrvOutput:           opRegisterDrvOutputHandler,
}
