package daemon

// Protocol constants (worker-protocol.md §2–§4).
const (
	workerMagic1 = 0x6e697863
	workerMagic2 = 0x6478696f

	// protocolVersion is what we advertise: 1.37, as harmonia-daemon and
	// go-nix do. No op is gated by 1.38 itself, and 1.37 avoids the
	// features exchange.
	protocolVersion = 1<<8 | 37
	// minClientMinor is the oldest client we serve: 1.21 is Nix 2.3.
	minClientMinor = 21

	// nixVersion is sent in handshake step 8 and shown by `nix store ping`.
	// It starts with the Nix version whose behaviour we follow.
	nixVersion = "2.8.0 (nixyard)"
)

// Logger channel tags (§3.1).
const (
	stderrNext          = 0x6f6c6d67
	stderrRead          = 0x64617461
	stderrWrite         = 0x64617416
	stderrLast          = 0x616c7473
	stderrError         = 0x63787470
	stderrStartActivity = 0x53545254
	stderrStopActivity  = 0x53544f50
	stderrResult        = 0x52534c54
)

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

// Activity and result types (§3.2).
const (
	actUnknown       = 0
	actOptimiseStore = 106
	actVerifyPaths   = 107

	resFileLinked = 100
)

// exportMagic follows the NAR in the export format ("NIXE").
const exportMagic = 0x4558494e

// Operation numbers (§6).
const (
	opIsValidPath                 = 1
	opHasSubstitutes              = 3
	opQueryPathHash               = 4
	opQueryReferences             = 5
	opQueryReferrers              = 6
	opAddToStore                  = 7
	opAddTextToStore              = 8
	opBuildPaths                  = 9
	opEnsurePath                  = 10
	opAddTempRoot                 = 11
	opAddIndirectRoot             = 12
	opSyncWithGC                  = 13
	opFindRoots                   = 14
	opExportPath                  = 16
	opQueryDeriver                = 18
	opSetOptions                  = 19
	opCollectGarbage              = 20
	opQuerySubstitutablePathInfo  = 21
	opQueryDerivationOutputs      = 22
	opQueryAllValidPaths          = 23
	opQueryFailedPaths            = 24
	opClearFailedPaths            = 25
	opQueryPathInfo               = 26
	opImportPaths                 = 27
	opQueryDerivationOutputNames  = 28
	opQueryPathFromHashPart       = 29
	opQuerySubstitutablePathInfos = 30
	opQueryValidPaths             = 31
	opQuerySubstitutablePaths     = 32
	opQueryValidDerivers          = 33
	opOptimiseStore               = 34
	opVerifyStore                 = 35
	opBuildDerivation             = 36
	opAddSignatures               = 37
	opNarFromPath                 = 38
	opAddToStoreNar               = 39
	opQueryMissing                = 40
	opQueryDerivationOutputMap    = 41
	opRegisterDrvOutput           = 42
	opQueryRealisation            = 43
	opAddMultipleToStore          = 44
	opAddBuildLog                 = 45
	opBuildPathsWithResults       = 46
	opAddPermRoot                 = 47
)

// opNames names every op for logs and errors.
var opNames = map[uint64]string{
	opIsValidPath: "IsValidPath", opHasSubstitutes: "HasSubstitutes", opQueryPathHash: "QueryPathHash",
	opQueryReferences: "QueryReferences", opQueryReferrers: "QueryReferrers", opAddToStore: "AddToStore",
	opAddTextToStore: "AddTextToStore", opBuildPaths: "BuildPaths", opEnsurePath: "EnsurePath",
	opAddTempRoot: "AddTempRoot", opAddIndirectRoot: "AddIndirectRoot", opSyncWithGC: "SyncWithGC",
	opFindRoots: "FindRoots", opExportPath: "ExportPath", opQueryDeriver: "QueryDeriver",
	opSetOptions: "SetOptions", opCollectGarbage: "CollectGarbage",
	opQuerySubstitutablePathInfo: "QuerySubstitutablePathInfo", opQueryDerivationOutputs: "QueryDerivationOutputs",
	opQueryAllValidPaths: "QueryAllValidPaths", opQueryFailedPaths: "QueryFailedPaths",
	opClearFailedPaths: "ClearFailedPaths", opQueryPathInfo: "QueryPathInfo", opImportPaths: "ImportPaths",
	opQueryDerivationOutputNames: "QueryDerivationOutputNames", opQueryPathFromHashPart: "QueryPathFromHashPart",
	opQuerySubstitutablePathInfos: "QuerySubstitutablePathInfos", opQueryValidPaths: "QueryValidPaths",
	opQuerySubstitutablePaths: "QuerySubstitutablePaths", opQueryValidDerivers: "QueryValidDerivers",
	opOptimiseStore: "OptimiseStore", opVerifyStore: "VerifyStore", opBuildDerivation: "BuildDerivation",
	opAddSignatures: "AddSignatures", opNarFromPath: "NarFromPath", opAddToStoreNar: "AddToStoreNar",
	opQueryMissing: "QueryMissing", opQueryDerivationOutputMap: "QueryDerivationOutputMap",
	opRegisterDrvOutput: "RegisterDrvOutput", opQueryRealisation: "QueryRealisation",
	opAddMultipleToStore: "AddMultipleToStore", opAddBuildLog: "AddBuildLog",
	opBuildPathsWithResults: "BuildPathsWithResults", opAddPermRoot: "AddPermRoot",
}

func opName(op uint64) string {
	if n, ok := opNames[op]; ok {
		return n
	}
	return "unknown"
}
