// Package luatest runs Sluice's ArgoCD health checks and resource actions in ArgoCD's own Lua
// engine (github.com/argoproj/argo-cd/v3/util/lua), loaded the way ArgoCD loads them: from the
// argocd-cm ConfigMap, through ArgoCD's settings manager.
//
// The scripts' source is config/argocd/resource_customizations/<group>/<Kind>/, laid out like
// ArgoCD's own resource_customizations directory (health.lua, health_test.yaml,
// actions/discovery.lua, actions/<name>/action.lua, actions/action_test.yaml, testdata/).
// config/argocd/argocd-cm.yaml and the chart's copy are generated from it: run
// `SLUICE_BLESS=1 go test ./luatest` after changing a script.
package luatest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/yaml"

	"github.com/argoproj/argo-cd/v3/common"
	appv1 "github.com/argoproj/argo-cd/v3/pkg/apis/application/v1alpha1"
	"github.com/argoproj/argo-cd/v3/util/settings"
)

const (
	group = "sluice.dev"
	// Prepended to every Rollout action: the function they all call.
	requestPrelude = "request.lua"
)

var (
	repoRoot       = filepath.Join("..", "..", "..")
	sourceDir      = filepath.Join(repoRoot, "config", "argocd", "resource_customizations", group)
	generatedFiles = []string{
		filepath.Join(repoRoot, "config", "argocd", "argocd-cm.yaml"),
		filepath.Join(repoRoot, "charts", "sluice", "files", "argocd-cm.yaml"),
	}
)

func read(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return string(data)
}

// kinds lists the kinds that have scripts, sorted.
func kinds(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir(sourceDir)
	if err != nil {
		t.Fatalf("read %s: %v", sourceDir, err)
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out
}

// argocdCmData is the argocd-cm data that carries the scripts, in ArgoCD's split-key form
// (resource.customizations.<health|actions>.<group>_<Kind>).
func argocdCmData(t *testing.T) map[string]string {
	t.Helper()
	data := map[string]string{}
	for _, kind := range kinds(t) {
		dir := filepath.Join(sourceDir, kind)
		key := group + "_" + kind
		data["resource.customizations.health."+key] = read(t, filepath.Join(dir, "health.lua"))
		actionsDir := filepath.Join(dir, "actions")
		if _, err := os.Stat(actionsDir); err != nil {
			continue
		}
		prelude := read(t, filepath.Join(actionsDir, requestPrelude))
		actions := appv1.ResourceActions{ActionDiscoveryLua: read(t, filepath.Join(actionsDir, "discovery.lua"))}
		entries, err := os.ReadDir(actionsDir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if !e.IsDir() || e.Name() == "testdata" {
				continue
			}
			body := read(t, filepath.Join(actionsDir, e.Name(), "action.lua"))
			actions.Definitions = append(actions.Definitions, appv1.ResourceActionDefinition{
				Name:      e.Name(),
				ActionLua: prelude + "\n" + body,
			})
		}
		encoded, err := yaml.Marshal(actions)
		if err != nil {
			t.Fatal(err)
		}
		data["resource.customizations.actions."+key] = string(encoded)
	}
	return data
}

func argocdCm(t *testing.T) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "ConfigMap"},
		ObjectMeta: metav1.ObjectMeta{
			Name:      common.ArgoCDConfigMapName,
			Namespace: "argocd",
			Labels:    map[string]string{"app.kubernetes.io/part-of": "argocd"},
		},
		Data: argocdCmData(t),
	}
}

const generatedHeader = `# Sluice's ArgoCD health checks and resource actions, as argocd-cm entries.
# Generated from config/argocd/resource_customizations by e2e/argocd/luatest
# (SLUICE_BLESS=1 go test ./luatest); do not edit by hand.
#
# Merge the keys into ArgoCD's own argocd-cm without taking over its other settings:
#   kubectl apply --server-side --field-manager sluice-argocd -f argocd-cm.yaml
# or use the file as a kustomize patch of argocd-cm. See docs/gitops.md.
`

func TestTheGeneratedArgocdCmIsInSync(t *testing.T) {
	body, err := yaml.Marshal(argocdCm(t))
	if err != nil {
		t.Fatal(err)
	}
	want := generatedHeader + string(body)
	for _, path := range generatedFiles {
		if os.Getenv("SLUICE_BLESS") == "1" {
			if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil || !bytes.Equal(got, []byte(want)) {
			t.Errorf("%s is out of date with config/argocd/resource_customizations: run `SLUICE_BLESS=1 go test ./luatest` in e2e/argocd", path)
		}
	}
}

// overrides loads the generated argocd-cm through ArgoCD's settings manager, exactly as the
// application controller and the API server read it.
func overrides(t *testing.T) map[string]appv1.ResourceOverride {
	t.Helper()
	var cm corev1.ConfigMap
	if err := yaml.Unmarshal([]byte(read(t, generatedFiles[0])), &cm); err != nil {
		t.Fatalf("parse %s: %v", generatedFiles[0], err)
	}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{
		Name: common.ArgoCDSecretName, Namespace: "argocd",
		Labels: map[string]string{"app.kubernetes.io/part-of": "argocd"},
	}}
	client := fake.NewClientset(&cm, secret)
	mgr := settings.NewSettingsManager(context.Background(), client, "argocd")
	found, err := mgr.GetResourceOverrides()
	if err != nil {
		t.Fatalf("ArgoCD rejects argocd-cm: %v", err)
	}
	for _, kind := range kinds(t) {
		key := group + "/" + kind
		if strings.TrimSpace(found[key].HealthLua) == "" {
			t.Fatalf("ArgoCD found no health check for %s in argocd-cm (keys: %v)", key, keysOf(found))
		}
	}
	return found
}

func keysOf(m map[string]appv1.ResourceOverride) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
