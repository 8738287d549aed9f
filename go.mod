module github.com/nixyard/nixyard

go 1.26.8

require (
	github.com/mattn/go-sqlite3 v1.14.32 // indirect
	golang.org/x/sys v0.50.0 // indirect
)
