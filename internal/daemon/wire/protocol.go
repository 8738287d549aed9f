package wire

// Constants of the worker protocol shared by the daemon, its client and the
// benchmark's null server (worker-protocol.md §2, §3.1, §6).

// Handshake magic numbers (§2.1): the client's, then the daemon's.
const (
	WorkerMagic1 = 0x6e697863
	WorkerMagic2 = 0x6478696f
)

// Logger channel tags (§3.1).
const (
	StderrNext          = 0x6f6c6d67
	StderrRead          = 0x64617461
	StderrWrite         = 0x64617416
	StderrLast          = 0x616c7473
	StderrError         = 0x63787470
	StderrStartActivity = 0x53545254
	StderrStopActivity  = 0x53544f50
	StderrResult        = 0x52534c54
)

// Operation numbers (§6).
const (
	OpIsValidPath                 = 1
	OpHasSubstitutes              = 3
	OpQueryPathHash               = 4
	OpQueryReferences             = 5
	OpQueryReferrers              = 6
	OpAddToStore                  = 7
	OpAddTextToStore              = 8
	OpBuildPaths                  = 9
	OpEnsurePath                  = 10
	OpAddTempRoot                 = 11
	OpAddIndirectRoot             = 12
	OpSyncWithGC                  = 13
	OpFindRoots                   = 14
	OpExportPath                  = 16
	OpQueryDeriver                = 18
	OpSetOptions                  = 19
	OpCollectGarbage              = 20
	OpQuerySubstitutablePathInfo  = 21
	OpQueryDerivationOutputs      = 22
	OpQueryAllValidPaths          = 23
	OpQueryFailedPaths            = 24
	OpClearFailedPaths            = 25
	OpQueryPathInfo               = 26
	OpImportPaths                 = 27
	OpQueryDerivationOutputNames  = 28
	OpQueryPathFromHashPart       = 29
	OpQuerySubstitutablePathInfos = 30
	OpQueryValidPaths             = 31
	OpQuerySubstitutablePaths     = 32
	OpQueryValidDerivers          = 33
	OpOptimiseStore               = 34
	OpVerifyStore                 = 35
	OpBuildDerivation             = 36
	OpAddSignatures               = 37
	OpNarFromPath                 = 38
	OpAddToStoreNar               = 39
	OpQueryMissing                = 40
	OpQueryDerivationOutputMap    = 41
	OpRegisterDrvOutput           = 42
	OpQueryRealisation            = 43
	OpAddMultipleToStore          = 44
	OpAddBuildLog                 = 45
	OpBuildPathsWithResults       = 46
	OpAddPermRoot                 = 47
)
