// Package nixbase32 implements Nix's base-32 encoding: the alphabet
// "0123456789abcdfghijklmnpqrsvwxyz" with bytes read from the end, as used in
// store path hashes and in "sha256:<nix32>" hash strings.
package nixbase32

import (
	"fmt"
	"strings"
)

const alphabet = "0123456789abcdfghijklmnpqrsvwxyz"

var decodeMap = func() [256]int8 {
	var m [256]int8
	for i := range m {
		m[i] = -1
	}
	for i := 0; i < len(alphabet); i++ {
		m[alphabet[i]] = int8(i)
	}
	return m
}()

// EncodedLen returns the length of the encoding of n bytes.
func EncodedLen(n int) int {
	if n == 0 {
		return 0
	}
	return (n*8-1)/5 + 1
}

// DecodedLen returns the number of bytes encoded by a string of n characters.
func DecodedLen(n int) int {
	return n * 5 / 8
}

// EncodeToString encodes src in Nix base-32.
func EncodeToString(src []byte) string {
	n := EncodedLen(len(src))
	var b strings.Builder
	b.Grow(n)
	for i := n - 1; i >= 0; i-- {
		bit := i * 5
		j, k := bit/8, uint(bit%8)
		c := int(src[j]) >> k
		if j+1 < len(src) {
			c |= int(src[j+1]) << (8 - k)
		}
		b.WriteByte(alphabet[c&0x1f])
	}
	return b.String()
}

// DecodeString decodes a Nix base-32 string. It rejects characters outside
// the alphabet and encodings whose unused high bits are not zero.
func DecodeString(s string) ([]byte, error) {
	out := make([]byte, DecodedLen(len(s)))
	for n := 0; n < len(s); n++ {
		c := s[len(s)-n-1]
		d := decodeMap[c]
		if d < 0 {
			return nil, fmt.Errorf("nixbase32: invalid character %q at offset %d", c, len(s)-n-1)
		}
		bit := n * 5
		i, j := bit/8, uint(bit%8)
		if i < len(out) {
			out[i] |= byte(d) << j
		}
		carry := int(d) >> (8 - j)
		if i+1 < len(out) {
			out[i+1] |= byte(carry)
		} else if carry != 0 || (i >= len(out) && d != 0) {
			return nil, fmt.Errorf("nixbase32: invalid encoding %q (non-zero trailing bits)", s)
		}
	}
	return out, nil
}

// Is reports whether every character of s is in the Nix base-32 alphabet.
func Is(s string) bool {
	for i := 0; i < len(s); i++ {
		if decodeMap[s[i]] < 0 {
			return false
		}
	}
	return true
}
