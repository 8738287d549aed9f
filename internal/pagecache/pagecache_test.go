package pagecache

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestMeminfo(t *testing.T) {
	v, err := Meminfo("MemTotal:", "Dirty:")
	if err != nil {
		t.Fatal(err)
	}
	if v[0] == 0 {
		t.Errorf("MemTotal: 0 bytes")
	}
	if _, err := Meminfo("MemTotal:", "NoSuchLine:"); err == nil {
		t.Errorf("Meminfo of a line /proc/meminfo lacks: no error")
	}
	if _, err := Dirty(); err != nil {
		t.Error(err)
	}
}

func TestParseMeminfo(t *testing.T) {
	text := []byte("MemTotal:       24608164 kB\nDirtyish:            1 kB\nHugePages_Total:       0\n" +
		"Dirty:               132 kB\nWriteback:             0 kB\nWriteback2:  7 kB") // no final newline
	v, err := parseMeminfo(text, []string{"Writeback:", "Dirty:", "MemTotal:", "Writeback2:"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []uint64{0, 132 << 10, 24608164 << 10, 7 << 10}; !slices.Equal(v, want) {
		t.Errorf("parsed %v, want %v", v, want)
	}
	for _, f := range []string{"HugePages_Total:", "Dirt:", "Dirty"} {
		if _, err := parseMeminfo(text, []string{f}); err == nil {
			t.Errorf("%q: no error", f)
		}
	}
}

func TestWriteUnsyncedThenSyncFS(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "other")
	if err := WriteUnsynced(context.Background(), p, 3<<20+1); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(p); err != nil || st.Size() != 4<<20 {
		t.Errorf("written: %v, %v; want 4 MiB", st, err)
	}
	if err := SyncFS(dir); err != nil {
		t.Error(err)
	}
	if err := SyncFS(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("SyncFS of a missing directory: %v, want not exist", err)
	}
}

func TestWriteUnsyncedCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	p := filepath.Join(t.TempDir(), "other")
	if err := WriteUnsynced(ctx, p, 1<<20); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v, want context.Canceled", err)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a cancelled write left %s behind (%v)", p, err)
	}
}
