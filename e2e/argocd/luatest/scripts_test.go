package luatest

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"testing"
	"time"

	"github.com/argoproj/gitops-engine/pkg/health"
	glua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	appv1 "github.com/argoproj/argo-cd/v3/pkg/apis/application/v1alpha1"
	argolua "github.com/argoproj/argo-cd/v3/util/lua"
)

// The same file formats as ArgoCD's resource_customizations tests.
type healthTests struct {
	Tests []struct {
		InputPath    string              `json:"inputPath"`
		HealthStatus health.HealthStatus `json:"healthStatus"`
	} `json:"tests"`
}

type actionTests struct {
	DiscoveryTests []struct {
		InputPath string                 `json:"inputPath"`
		Result    []appv1.ResourceAction `json:"result"`
	} `json:"discoveryTests"`
	ActionTests []struct {
		Action    string `json:"action"`
		InputPath string `json:"inputPath"`
		// The status field the action must write; nothing else may change.
		Writes string `json:"writes"`
	} `json:"actionTests"`
}

func load(t *testing.T, path string, into any) {
	t.Helper()
	if err := yaml.Unmarshal([]byte(read(t, path)), into); err != nil {
		t.Fatalf("parse %s: %v", path, err)
	}
}

func object(t *testing.T, path string) *unstructured.Unstructured {
	t.Helper()
	obj := map[string]any{}
	load(t, path, &obj)
	return &unstructured.Unstructured{Object: obj}
}

// vm is ArgoCD's Lua VM as the controller and API server build it: the scripts come from
// argocd-cm, and custom scripts run without the standard libraries (no string, no math).
func vm(t *testing.T) argolua.VM {
	return argolua.VM{ResourceOverrides: overrides(t)}
}

func TestHealthChecks(t *testing.T) {
	luaVM := vm(t)
	for _, kind := range kinds(t) {
		dir := filepath.Join(sourceDir, kind)
		var cases healthTests
		load(t, filepath.Join(dir, "health_test.yaml"), &cases)
		if len(cases.Tests) == 0 {
			t.Errorf("%s: health_test.yaml has no tests", kind)
		}
		for _, c := range cases.Tests {
			t.Run(kind+"/"+c.InputPath, func(t *testing.T) {
				obj := object(t, filepath.Join(dir, c.InputPath))
				script, useOpenLibs, err := luaVM.GetHealthScript(obj)
				if err != nil || script == "" {
					t.Fatalf("no health script for %s: %v", obj.GroupVersionKind(), err)
				}
				if useOpenLibs {
					t.Fatalf("the script must run as ArgoCD runs custom scripts: without open libraries")
				}
				got, err := luaVM.ExecuteHealthLua(obj, script)
				if err != nil {
					t.Fatalf("health.lua failed: %v", err)
				}
				if !reflect.DeepEqual(*got, c.HealthStatus) {
					t.Errorf("health = %+v, want %+v", *got, c.HealthStatus)
				}
			})
		}
	}
}

func TestActionDiscovery(t *testing.T) {
	luaVM := vm(t)
	for _, kind := range kinds(t) {
		dir := filepath.Join(sourceDir, kind, "actions")
		if _, err := os.Stat(dir); err != nil {
			continue
		}
		var cases actionTests
		load(t, filepath.Join(dir, "action_test.yaml"), &cases)
		for _, c := range cases.DiscoveryTests {
			t.Run(kind+"/"+c.InputPath, func(t *testing.T) {
				obj := object(t, filepath.Join(dir, c.InputPath))
				scripts, err := luaVM.GetResourceActionDiscovery(obj)
				if err != nil {
					t.Fatal(err)
				}
				got, err := luaVM.ExecuteResourceActionDiscovery(obj, scripts)
				if err != nil {
					t.Fatalf("discovery.lua failed: %v", err)
				}
				sortActions(got)
				want := append([]appv1.ResourceAction(nil), c.Result...)
				sortActions(want)
				if !reflect.DeepEqual(got, want) {
					t.Errorf("actions =\n%s\nwant\n%s", dump(got), dump(want))
				}
			})
		}
	}
}

var intentID = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ/argocd/[0-9]+$`)

func TestActions(t *testing.T) {
	luaVM := vm(t)
	for _, kind := range kinds(t) {
		dir := filepath.Join(sourceDir, kind, "actions")
		if _, err := os.Stat(dir); err != nil {
			continue
		}
		var cases actionTests
		load(t, filepath.Join(dir, "action_test.yaml"), &cases)
		tested := map[string]bool{}
		for _, c := range cases.ActionTests {
			tested[c.Action] = true
			t.Run(kind+"/"+c.Action+"/"+c.InputPath, func(t *testing.T) {
				obj := object(t, filepath.Join(dir, c.InputPath))
				before := obj.DeepCopy()
				action, err := luaVM.GetResourceAction(obj, c.Action)
				if err != nil {
					t.Fatal(err)
				}
				start := time.Now().Truncate(time.Second)
				impacted, err := luaVM.ExecuteResourceAction(obj, action.ActionLua, nil)
				if err != nil {
					t.Fatalf("action.lua failed: %v", err)
				}
				if len(impacted) != 1 || impacted[0].K8SOperation != argolua.PatchOperation {
					t.Fatalf("want one patch of the Rollout, got %+v", impacted)
				}
				after := impacted[0].UnstructuredObj
				intent, found, err := unstructured.NestedMap(after.Object, "status", c.Writes)
				if err != nil || !found {
					t.Fatalf("status.%s not written: %v", c.Writes, err)
				}
				id, _ := intent["id"].(string)
				if !intentID.MatchString(id) {
					t.Errorf("id %q does not look like <time>/argocd/<resourceVersion>", id)
				}
				at, err := time.Parse(time.RFC3339, fmt.Sprint(intent["requestedAt"]))
				if err != nil || at.Before(start) || at.After(time.Now().Add(time.Second)) {
					t.Errorf("requestedAt %v is not now (%v): %v", intent["requestedAt"], start, err)
				}
				if intent["requestedBy"] != "argocd" || intent["reason"] == nil {
					t.Errorf("requestedBy/reason = %v/%v", intent["requestedBy"], intent["reason"])
				}
				// Nothing else changes: the spec (git's) and the operator's status fields.
				unstructured.RemoveNestedField(after.Object, "status", c.Writes)
				unstructured.RemoveNestedField(before.Object, "status", c.Writes)
				if status, _, _ := unstructured.NestedMap(after.Object, "status"); len(status) == 0 {
					if _, had, _ := unstructured.NestedMap(before.Object, "status"); !had {
						unstructured.RemoveNestedField(after.Object, "status")
					}
				}
				if !reflect.DeepEqual(normalize(t, after.Object), normalize(t, before.Object)) {
					t.Errorf("the action changed more than status.%s:\n%s\nwas\n%s", c.Writes, dump(after.Object), dump(before.Object))
				}
			})
		}
		definitions := overrides(t)[group+"/"+kind].Actions
		var parsed appv1.ResourceActions
		if err := yaml.Unmarshal([]byte(definitions), &parsed); err != nil {
			t.Fatal(err)
		}
		for _, d := range parsed.Definitions {
			if !tested[d.Name] {
				t.Errorf("%s: action %s has no test in action_test.yaml", kind, d.Name)
			}
		}
	}
}

// The Lua VM hands numbers back as float64; compare through JSON so 3 and 3.0 are equal.
func normalize(t *testing.T, obj map[string]any) any {
	t.Helper()
	data, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	var out any
	if err := json.Unmarshal(data, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// The hand-written UTC conversion in request.lua agrees with Go's for dates across four
// centuries, leap days and the ends of months and years among them.
func TestRequestTimesAreUTC(t *testing.T) {
	prelude := read(t, filepath.Join(sourceDir, "Rollout", "actions", requestPrelude))
	l := glua.NewState(glua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, open := range []glua.LGFunction{glua.OpenPackage, glua.OpenBase, glua.OpenTable} {
		l.Push(l.NewFunction(open))
		l.Call(0, 0)
	}
	l.PreloadModule(glua.OsLibName, argolua.SafeOsLoader)
	if err := l.DoString(prelude + "\nsluice_utc = utc"); err != nil {
		t.Fatal(err)
	}
	var seconds []int64
	for s := int64(0); s < 13_000_000_000; s += 7_777_777 {
		seconds = append(seconds, s)
	}
	for _, day := range []string{"2000-02-29T23:59:59Z", "2024-12-31T23:59:59Z", "2100-03-01T00:00:00Z", "2026-12-03T07:05:09Z"} {
		at, _ := time.Parse(time.RFC3339, day)
		seconds = append(seconds, at.Unix())
	}
	for _, s := range seconds {
		if err := l.CallByParam(glua.P{Fn: l.GetGlobal("sluice_utc"), NRet: 1, Protect: true}, glua.LNumber(s)); err != nil {
			t.Fatal(err)
		}
		got := l.Get(-1).String()
		l.Pop(1)
		if want := time.Unix(s, 0).UTC().Format(time.RFC3339); got != want {
			t.Fatalf("utc(%d) = %s, want %s", s, got, want)
		}
	}
}

func sortActions(actions []appv1.ResourceAction) {
	sort.Slice(actions, func(i, j int) bool { return actions[i].Name < actions[j].Name })
}

func dump(v any) string {
	data, _ := yaml.Marshal(v)
	return string(data)
}
