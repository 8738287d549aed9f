package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/nixyard/nixyard/internal/doctor"
)

const doctorUsage = `usage: nixyard doctor [--store URL]

Run inside a CI job: checks that the job's Nix reaches nixyard properly
(socket, protocol, host store visible read-only at the right root, trust,
job session). URL defaults to $NIX_REMOTE, else "daemon".
`

func runDoctor(ctx context.Context, args []string) error {
	url := os.Getenv("NIX_REMOTE")
	for i := 0; i < len(args); i++ {
		switch args[i] {
		case "--store":
			if i+1 >= len(args) {
				return errors.New("doctor: --store needs a URL")
			}
			i++
			url = args[i]
		case "-h", "--help":
			fmt.Print(doctorUsage)
			return nil
		default:
			return fmt.Errorf("doctor: unknown argument %q", args[i])
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	r := doctor.Run(ctx, url)
	if err := r.Write(os.Stdout); err != nil {
		return err
	}
	if r.Failed() {
		return errors.New("doctor: some checks failed")
	}
	return nil
}
