//go:build !(cgo && linux)

package substitute

import "io"

// newLiblzmaReader reports that liblzma is not available: this build has
// no cgo.
func newLiblzmaReader(r io.Reader) (_ io.Reader, release func(), ok bool, err error) {
	return nil, nil, false, nil
}
