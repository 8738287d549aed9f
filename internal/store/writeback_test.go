package store

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// TestAddWritebackErrorFailsAdd: a writeback error reported between the
// time a path's files are written and the time it would be registered
// fails the addition, and leaves neither a registration nor files: for a
// stream (AddMultipleToStoreNar's batches) and for a single path
// (AddToStoreNar's group commit).
func TestAddWritebackErrorFailsAdd(t *testing.T) {
	forceSyncfs(t)
	ctx := context.Background()
	check := func(t *testing.T, s *Store, err error, infos []PathInfo) {
		t.Helper()
		if !errors.Is(err, unix.EIO) {
			t.Errorf("err = %v, want EIO", err)
		}
		for _, info := range infos {
			if ok, _ := s.IsValidPathFresh(ctx, info.Path); ok {
				t.Errorf("%s registered though its files may not be on disk", info.Path)
			}
			if _, err := os.Lstat(s.RealPath(info.Path)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s: files left after a failed addition (%v)", info.Path, err)
			}
		}
	}
	t.Run("stream", func(t *testing.T) {
		s, _ := testStore(t)
		var infos []PathInfo
		var stream bytes.Buffer
		for i := range 3 {
			d := narOf(t, map[string]string{"f": strings.Repeat("w", i+1)})
			infos = append(infos, caNARInfo(t, s, "w", d, nil))
			stream.Write(d)
		}
		i := 0
		err := s.AddMultipleToStoreNar(ctx, func() (PathInfo, io.Reader, error) {
			if i == len(infos) {
				reportedElsewhere(s, unix.EIO) // after the last path's files were written
				return PathInfo{}, nil, io.EOF
			}
			i++
			return infos[i-1], &stream, nil
		}, AddOptions{})
		check(t, s, err, infos)
	})
	t.Run("single", func(t *testing.T) {
		s, _ := testStore(t)
		d := narOf(t, map[string]string{"f": "single"})
		info := caNARInfo(t, s, "single", d, nil)
		err := s.AddToStoreNar(ctx, info, errorBeforeLastByte(s, d), AddOptions{})
		check(t, s, err, []PathInfo{info})
	})
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// forceSyncfs has the store make paths durable by syncfs for the rest of
// t (no other data looks dirty), the way on which reportedElsewhere's
// errors are seen.
func forceSyncfs(t *testing.T) {
	prev := dirtyBytes
	t.Cleanup(func() { dirtyBytes = prev })
	dirtyBytes = func() (uint64, error) { return 0, nil }
}

// errorBeforeLastByte reads nar, and has the file system report a
// writeback error (reportedElsewhere) before it gives the last byte: once
// the path's files are written, before it can be registered.
func errorBeforeLastByte(s *Store, nar []byte) io.Reader {
	last := false
	return io.MultiReader(bytes.NewReader(nar[:len(nar)-1]), readerFunc(func(p []byte) (int, error) {
		if last {
			return 0, io.EOF
		}
		reportedElsewhere(s, unix.EIO)
		last = true
		p[0] = nar[len(nar)-1]
		return 1, nil
	}))
}

// TestRepairWritebackErrorKeepsOld: a repair whose new files meet a
// writeback error is refused, and the old files and registration stay.
func TestRepairWritebackErrorKeepsOld(t *testing.T) {
	forceSyncfs(t)
	s, _ := testStore(t)
	ctx := context.Background()
	d := narOf(t, map[string]string{"f": "repaired"})
	info := caNARInfo(t, s, "repaired", d, nil)
	if err := s.AddToStoreNar(ctx, info, bytes.NewReader(d), AddOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.RepairPathNar(ctx, info, errorBeforeLastByte(s, d)); !errors.Is(err, unix.EIO) {
		t.Errorf("repair after a writeback error: %v, want EIO", err)
	}
	if ok, _ := s.IsValidPathFresh(ctx, info.Path); !ok {
		t.Errorf("%s no longer valid after a failed repair", info.Path)
	}
}

// TestRegisterOutputsWritebackError: build outputs written before a
// writeback error are not registered.
func TestRegisterOutputsWritebackError(t *testing.T) {
	forceSyncfs(t)
	s, root := testStore(t)
	ctx := context.Background()
	out, _ := s.Dir().Parse("/nix/store/00000000000000000000000000000000-out")
	drv, _ := s.Dir().Parse("/nix/store/11111111111111111111111111111111-out.drv")
	src := root + "/build"
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(src+"/f", []byte("built"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := s.LockOutputs(ctx, []storepath.Path{out})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	reportedElsewhere(s, unix.EIO) // while the build wrote its output
	if _, err := l.Register(ctx, drv, []BuiltOutput{{Name: "out", Path: out, Src: src}}, nil, nil); !errors.Is(err, unix.EIO) {
		t.Errorf("Register after a writeback error: %v, want EIO", err)
	}
	if ok, _ := s.IsValidPathFresh(ctx, out); ok {
		t.Errorf("%s registered though its files may not be on disk", out)
	}
}
