//go:build tools

// Package tools pins policy-controller's policy tester.
package tools

import _ "github.com/sigstore/policy-controller/cmd/tester"
