package pagecache

import "testing"

func BenchmarkDirty(b *testing.B) {
	for range b.N {
		if _, err := Dirty(); err != nil {
			b.Fatal(err)
		}
	}
}
