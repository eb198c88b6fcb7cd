"""The one layer the CLI and the TUI call: validate a request, read the store, call one pure engine
method, record the run."""
