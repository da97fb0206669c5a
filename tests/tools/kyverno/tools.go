//go:build tools

// Package tools pins Kyverno's command-line tool.
package tools

import _ "github.com/kyverno/kyverno/cmd/cli/kubectl-kyverno"
