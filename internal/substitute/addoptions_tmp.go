package substitute

// addOptions stands in for store.AddOptions until internal/store lands it.
// TODO(substitute): replace with store.AddOptions.
type addOptions = struct{ Repair, CheckSigs bool }
