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
	ctx, stopNow := signals()
	if err := run(ctx, stopNow, os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "nixyard: %v\n", err)
		os.Exit(1)
	}
}

// signals returns a context that the first SIGINT, SIGTERM or SIGHUP cancels (a
// daemon then stops accepting connections and lets those open finish),
// and a channel that the second closes (stop now).
func signals() (context.Context, <-chan struct{}) {
	ctx, cancel := context.WithCancel(context.Background())
	now := make(chan struct{})
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	// SIGHUP too, unless it is ignored (nohup): a daemon started in a
	// terminal that is closed stops as gently as a service told to.
	if !signal.Ignored(syscall.SIGHUP) {
		signal.Notify(sigs, syscall.SIGHUP)
	}
	go func() {
		<-sigs
		cancel()
		<-sigs
		close(now)
	}()
	return ctx, now
}

func run(ctx context.Context, stopNow <-chan struct{}, args []string) error {
	if filepath.Base(args[0]) == "nix-daemon" {
		return runDaemon(ctx, stopNow, args[1:])
	}
	if len(args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		return fmt.Errorf("no command given")
	}
	switch args[1] {
	case "daemon":
		return runDaemon(ctx, stopNow, args[2:])
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
