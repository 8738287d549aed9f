// Package archtest holds tests about the shape of the code base: every
// package has exactly one doc comment, and lower layers never import higher
// ones (formats know nothing of the store, the store nothing of the wire).
package archtest
