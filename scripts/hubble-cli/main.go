// The hubble CLI, built from Cilium's own source (github.com/cilium/cilium/hubble, the
// version go.mod requires): scripts/setup.sh builds this module into /usr/local/bin/hubble.
// It is a main module of its own because `go install github.com/cilium/cilium/hubble@VERSION`
// refuses Cilium's go.mod (it has replace directives); go.sum pins every module it needs.
package main

import (
	"fmt"
	"os"

	"github.com/cilium/cilium/hubble/cmd"
)

func main() {
	if err := cmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, err.Error())
		os.Exit(1)
	}
}
