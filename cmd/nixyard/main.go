// Command nixyard is a drop-in replacement for nix-daemon built for shared CI
// hosts. Run as "nixyard daemon" or, installed or symlinked under the name
// nix-daemon, with nix-daemon's own arguments.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
)

const usage = `usage: nixyard <command> [arguments]

commands:
  daemon    serve a Nix store over the Nix daemon protocol (as nix-daemon)
  runner-config gitlab
            print a CI runner snippet for jobs that use the host's nixyard
  doctor    run inside a job: check its connection to nixyard
  version   print the version

Run "nixyard daemon --help" for the daemon's options.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "nixyard: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if filepath.Base(args[0]) == "nix-daemon" {
		return runDaemon(ctx, args[1:])
	}
	if len(args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		return fmt.Errorf("no command given")
	}
	switch args[1] {
	case "daemon":
		return runDaemon(ctx, args[2:])
	case "runner-config":
		return runRunnerConfig(args[2:])
	case "doctor":
		return runDoctor(ctx, args[2:])
	case "version", "--version":
		fmt.Println("nixyard", version)
		return nil
	case "help", "-h", "--help":
		fmt.Print(usage)
		return nil
	}
	fmt.Fprint(os.Stderr, usage)
	return fmt.Errorf("unknown command %q", args[1])
}
