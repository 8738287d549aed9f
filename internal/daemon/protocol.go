package daemon

import "github.com/nixyard/nixyard/internal/daemon/wire"

// Protocol constants (worker-protocol.md §2–§4).
const (
	// protocolVersion is what we advertise: 1.37, as harmonia-daemon and
	// go-nix do. No op is gated by 1.38 itself, and 1.37 avoids the
	// features exchange.
	protocolVersion = 1<<8 | 37
	// minClientMinor is the oldest client we serve: 1.21 is Nix 2.3.
	minClientMinor = 21

	// nixVersion is sent in handshake step 8 and shown by `nix store ping`.
	// It starts with the Nix version whose behaviour we follow.
	nixVersion = NixVersion + " (nixyard)"
)

// NixVersion is the Nix release whose daemon nixyard behaves as.
const NixVersion = "2.8.0"

// Verbosity is a log level, with the numbering of Nix 2.4 and later.
type Verbosity uint64

// The levels (§4).
const (
	lvlError Verbosity = iota
	lvlWarn
	lvlNotice
	lvlInfo
	lvlTalkative
	lvlChatty
	lvlDebug
	lvlVomit
)

// Activity and result types of the logger channel (§3.2), named as Nix
// names them (actFileTransfer was actDownload in Nix 2.3).
const (
	actUnknown       = 0
	actCopyPath      = 100
	actFileTransfer  = 101
	actRealise       = 102
	actCopyPaths     = 103
	actBuilds        = 104
	actBuild         = 105
	actOptimiseStore = 106
	actVerifyPaths   = 107
	actSubstitute    = 108
	actQueryPathInfo = 109
	actPostBuildHook = 110

	resFileLinked       = 100
	resBuildLogLine     = 101
	resSetPhase         = 104
	resProgress         = 105
	resSetExpected      = 106
	resPostBuildLogLine = 107
)

// exportMagic follows the NAR in the export format ("NIXE").
const exportMagic = 0x4558494e

// opNames names every op for logs and errors.
var opNames = map[uint64]string{
	wire.OpIsValidPath: "IsValidPath", wire.OpHasSubstitutes: "HasSubstitutes", wire.OpQueryPathHash: "QueryPathHash",
	wire.OpQueryReferences: "QueryReferences", wire.OpQueryReferrers: "QueryReferrers", wire.OpAddToStore: "AddToStore",
	wire.OpAddTextToStore: "AddTextToStore", wire.OpBuildPaths: "BuildPaths", wire.OpEnsurePath: "EnsurePath",
	wire.OpAddTempRoot: "AddTempRoot", wire.OpAddIndirectRoot: "AddIndirectRoot", wire.OpSyncWithGC: "SyncWithGC",
	wire.OpFindRoots: "FindRoots", wire.OpExportPath: "ExportPath", wire.OpQueryDeriver: "QueryDeriver",
	wire.OpSetOptions: "SetOptions", wire.OpCollectGarbage: "CollectGarbage",
	wire.OpQuerySubstitutablePathInfo: "QuerySubstitutablePathInfo", wire.OpQueryDerivationOutputs: "QueryDerivationOutputs",
	wire.OpQueryAllValidPaths: "QueryAllValidPaths", wire.OpQueryFailedPaths: "QueryFailedPaths",
	wire.OpClearFailedPaths: "ClearFailedPaths", wire.OpQueryPathInfo: "QueryPathInfo", wire.OpImportPaths: "ImportPaths",
	wire.OpQueryDerivationOutputNames: "QueryDerivationOutputNames", wire.OpQueryPathFromHashPart: "QueryPathFromHashPart",
	wire.OpQuerySubstitutablePathInfos: "QuerySubstitutablePathInfos", wire.OpQueryValidPaths: "QueryValidPaths",
	wire.OpQuerySubstitutablePaths: "QuerySubstitutablePaths", wire.OpQueryValidDerivers: "QueryValidDerivers",
	wire.OpOptimiseStore: "OptimiseStore", wire.OpVerifyStore: "VerifyStore", wire.OpBuildDerivation: "BuildDerivation",
	wire.OpAddSignatures: "AddSignatures", wire.OpNarFromPath: "NarFromPath", wire.OpAddToStoreNar: "AddToStoreNar",
	wire.OpQueryMissing: "QueryMissing", wire.OpQueryDerivationOutputMap: "QueryDerivationOutputMap",
	wire.OpRegisterDrvOutput: "RegisterDrvOutput", wire.OpQueryRealisation: "QueryRealisation",
	wire.OpAddMultipleToStore: "AddMultipleToStore", wire.OpAddBuildLog: "AddBuildLog",
	wire.OpBuildPathsWithResults: "BuildPathsWithResults", wire.OpAddPermRoot: "AddPermRoot",
}

func opName(op uint64) string {
	if n, ok := opNames[op]; ok {
		return n
	}
	return "unknown"
}
