// Command argocd is the part of ArgoCD the local cluster runs, built from the
// github.com/argoproj/argo-cd/v3 module: a multi-call binary like upstream's
// cmd/main.go, but with only the three components the end-to-end test needs.
//
//	argocd-application-controller  compares and syncs Applications
//	argocd-repo-server             renders manifests from the local git repository
//	argocd-server                  serves the API that runs resource actions
//
// The component is chosen by the name the binary is called by (symlinks), or by
// ARGOCD_BINARY_NAME, exactly as upstream does.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	appcontroller "github.com/argoproj/argo-cd/v3/cmd/argocd-application-controller/commands"
	reposerver "github.com/argoproj/argo-cd/v3/cmd/argocd-repo-server/commands"
	apiserver "github.com/argoproj/argo-cd/v3/cmd/argocd-server/commands"
	"github.com/argoproj/argo-cd/v3/util/log"
)

func init() {
	// Same as upstream: klog goes through ArgoCD's configured logger.
	klog.SetLogger(log.NewLogrusLogger(log.NewWithCurrentConfig()))
}

func main() {
	name := filepath.Base(os.Args[0])
	if val := os.Getenv("ARGOCD_BINARY_NAME"); val != "" {
		name = val
	}
	var command *cobra.Command
	switch name {
	case "argocd-application-controller":
		command = appcontroller.NewCommand()
	case "argocd-repo-server":
		command = reposerver.NewCommand()
	case "argocd-server":
		command = apiserver.NewCommand()
	default:
		fmt.Fprintf(os.Stderr, "argocd: called as %q; call it as argocd-application-controller, argocd-repo-server or argocd-server\n", name)
		os.Exit(2)
	}
	if err := command.Execute(); err != nil {
		os.Exit(1)
	}
}
