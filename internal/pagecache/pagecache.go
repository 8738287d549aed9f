// Package pagecache reads and moves what the kernel's page cache holds
// for a file system: how much of it is dirty, syncing a whole file system,
// and leaving data unwritten there as another job on the host would.
//
// The store decides how to make paths durable from Dirty; its tests, the
// end-to-end tests and the benchmark set up and clear the other jobs' data
// with WriteUnsynced and SyncFS.
package pagecache

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Meminfo returns the values of /proc/meminfo lines (e.g. "Dirty:",
// "MemAvailable:"), in bytes, in the order asked. The store asks for its
// Dirty before every sync, so it reads and parses without allocating per
// line.
func Meminfo(fields ...string) ([]uint64, error) {
	fd, err := unix.Open("/proc/meminfo", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("/proc/meminfo: %w", err)
	}
	defer unix.Close(fd)
	var buf [16 << 10]byte
	n := 0
	for n < len(buf) {
		m, err := unix.Read(fd, buf[n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("/proc/meminfo: %w", err)
		}
		if m == 0 {
			break
		}
		n += m
	}
	return parseMeminfo(buf[:n], fields)
}

// parseMeminfo finds the fields' lines ("Name:   123 kB") in text.
func parseMeminfo(text []byte, fields []string) ([]uint64, error) {
	vals := make([]uint64, len(fields))
	found := 0
	for len(text) > 0 {
		line := text
		if i := bytes.IndexByte(text, '\n'); i >= 0 {
			line, text = text[:i], text[i+1:]
		} else {
			text = nil
		}
		name, rest, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		num, ok := bytes.CutSuffix(bytes.TrimSpace(rest), []byte(" kB"))
		if !ok {
			continue
		}
		for i, want := range fields {
			if len(want) != len(name)+1 || want[len(name)] != ':' || want[:len(name)] != string(name) {
				continue
			}
			kb, err := strconv.ParseUint(string(bytes.TrimSpace(num)), 10, 64)
			if err != nil {
				return nil, fmt.Errorf("/proc/meminfo: %s: %w", want, err)
			}
			vals[i] = kb << 10
			found++
		}
	}
	if found != len(fields) {
		return nil, fmt.Errorf("/proc/meminfo: not all of %s", strings.Join(fields, " "))
	}
	return vals, nil
}

// Dirty returns the bytes of page cache that are dirty or being written
// back, on all file systems.
func Dirty() (uint64, error) {
	v, err := Meminfo("Dirty:", "Writeback:")
	if err != nil {
		return 0, err
	}
	return v[0] + v[1], nil
}

// SyncFS writes the file system that holds the directory dir to stable
// storage (syncfs(2)).
func SyncFS(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_DIRECTORY, 0)
	if err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// WriteUnsynced writes n bytes (rounded up to MiB) of random data to a
// new file at path and leaves them dirty in the page cache: another job's
// unwritten data, as a shared host has.
func WriteUnsynced(ctx context.Context, path string, n int64) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("writing unsynced data: %w", err)
	}
	block := make([]byte, 1<<20)
	rand.Read(block)
	for written := int64(0); written < n && err == nil; written += int64(len(block)) {
		if err = ctx.Err(); err == nil {
			block[(written>>20)%int64(len(block))]++ // no two blocks alike
			_, err = f.Write(block)
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing unsynced data to %s: %w", path, errors.Join(err, os.Remove(path)))
	}
	return nil
}
