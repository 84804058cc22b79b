package deploy

// The manifests in k8s/ checked offline, as far as that goes without an API server: every
// document decodes strictly into the Kubernetes API type its apiVersion and kind name (an
// unknown or misspelt field, a value of the wrong type or a duplicate key fails), and the
// references the API server or the kubelet would resolve later hold: selectors match their
// template, probes name ports the pod declares, secret references name a key of the Secret in
// the folder, a Job's restartPolicy is one a Job accepts, only init containers are sidecars.

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

// manifests are the objects of k8s/*.yaml, strictly decoded.
type manifests struct {
	deployments map[string]*appsv1.Deployment
	jobs        map[string]*batchv1.Job
	secrets     map[string]*corev1.Secret
}

// loadManifests decodes every document of every k8s/*.yaml file into its API type, failing the
// test on any field the type does not have.
func loadManifests(t *testing.T) manifests {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("k8s", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in k8s/: %v", err)
	}
	m := manifests{deployments: map[string]*appsv1.Deployment{}, jobs: map[string]*batchv1.Job{}, secrets: map[string]*corev1.Secret{}}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(data), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			where := fmt.Sprintf("%s, document %d", f, i+1)
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Fatalf("%s: %v", where, err)
			}
			var obj interface{ GetName() string }
			switch tm.APIVersion + " " + tm.Kind {
			case "apps/v1 Deployment":
				obj = &appsv1.Deployment{}
			case "batch/v1 Job":
				obj = &batchv1.Job{}
			case "v1 Secret":
				obj = &corev1.Secret{}
			default:
				t.Fatalf("%s: apiVersion %q kind %q: not a kind these tests know", where, tm.APIVersion, tm.Kind)
			}
			if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
				t.Fatalf("%s: not a valid %s: %v", where, tm.Kind, err)
			}
			name := obj.GetName()
			if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
				t.Errorf("%s: name %q: %s", where, name, strings.Join(errs, "; "))
			}
			switch o := obj.(type) {
			case *appsv1.Deployment:
				m.deployments[name] = o
			case *batchv1.Job:
				m.jobs[name] = o
			case *corev1.Secret:
				m.secrets[name] = o
			}
		}
	}
	return m
}

// stripComments drops the comment lines of a YAML document.
func stripComments(doc string) string {
	var b bytes.Buffer
	for line := range strings.Lines(doc) {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line)
		}
	}
	return b.String()
}

func TestManifestsAreValidKubernetesObjects(t *testing.T) {
	m := loadManifests(t)
	if len(m.deployments) != 3 || len(m.jobs) != 1 || len(m.secrets) != 1 {
		t.Fatalf("k8s/ holds %d Deployments, %d Jobs and %d Secrets; want 3, 1 and 1 (the recipes docs/deploy.md shows)",
			len(m.deployments), len(m.jobs), len(m.secrets))
	}
	for name, d := range m.deployments {
		sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil || sel.Empty() || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("Deployment %s: the selector %v does not select the template's labels %v (%v)", name, d.Spec.Selector, d.Spec.Template.Labels, err)
		}
		checkPod(t, "Deployment "+name, &d.Spec.Template.Spec, m.secrets)
		for _, c := range d.Spec.Template.Spec.Containers {
			if c.RestartPolicy != nil {
				t.Errorf("Deployment %s: container %s: restartPolicy is for init containers only", name, c.Name)
			}
		}
	}
	for name, j := range m.jobs {
		if p := j.Spec.Template.Spec.RestartPolicy; p != corev1.RestartPolicyNever && p != corev1.RestartPolicyOnFailure {
			t.Errorf("Job %s: restartPolicy %q; a Job takes Never or OnFailure", name, p)
		}
		checkPod(t, "Job "+name, &j.Spec.Template.Spec, m.secrets)
	}
}

// checkPod checks what the API server and the kubelet would check of a pod's containers.
func checkPod(t *testing.T, where string, spec *corev1.PodSpec, secrets map[string]*corev1.Secret) {
	t.Helper()
	if sc := spec.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Errorf("%s: the pod does not ask for runAsNonRoot", where)
	}
	all := slices.Concat(spec.InitContainers, spec.Containers)
	if len(spec.Containers) == 0 {
		t.Errorf("%s: no containers", where)
	}
	seen := map[string]bool{}
	podPorts := map[int32]bool{}
	for _, c := range all {
		for _, p := range c.Ports {
			podPorts[p.ContainerPort] = true
		}
	}
	for i, c := range all {
		w := where + ": container " + c.Name
		isInit := i < len(spec.InitContainers)
		if errs := validation.IsDNS1123Label(c.Name); len(errs) > 0 || seen[c.Name] {
			t.Errorf("%s: invalid or repeated name %v", w, errs)
		}
		seen[c.Name] = true
		if c.Image == "" {
			t.Errorf("%s: no image", w)
		}
		if c.RestartPolicy != nil && *c.RestartPolicy != corev1.ContainerRestartPolicyAlways {
			t.Errorf("%s: restartPolicy %q; an init container takes Always (a sidecar) or nothing", w, *c.RestartPolicy)
		}
		for _, p := range c.Ports {
			if p.Name != "" {
				if errs := validation.IsValidPortName(p.Name); len(errs) > 0 {
					t.Errorf("%s: port name %q: %v", w, p.Name, errs)
				}
			}
			if errs := validation.IsValidPortNum(int(p.ContainerPort)); len(errs) > 0 {
				t.Errorf("%s: port %d: %v", w, p.ContainerPort, errs)
			}
		}
		for kind, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
			if p == nil {
				continue
			}
			if p.HTTPGet == nil {
				t.Errorf("%s: %s probe is not an HTTP GET", w, kind)
				continue
			}
			if _, err := probePort(c, p.HTTPGet.Port); err != nil {
				t.Errorf("%s: %s probe: %v", w, kind, err)
			} else if p.HTTPGet.Port.Type == intstr.Int && !podPorts[p.HTTPGet.Port.IntVal] {
				t.Errorf("%s: %s probe: port %d is declared by no container of the pod", w, kind, p.HTTPGet.Port.IntVal)
			}
			if !strings.HasPrefix(p.HTTPGet.Path, "/") {
				t.Errorf("%s: %s probe path %q", w, kind, p.HTTPGet.Path)
			}
		}
		if c.RestartPolicy == nil && isInit && (c.ReadinessProbe != nil || c.LivenessProbe != nil || c.StartupProbe != nil) {
			t.Errorf("%s: an init container that is not a sidecar may not have probes", w)
		}
		for _, e := range c.Env {
			if errs := validation.IsEnvVarName(e.Name); len(errs) > 0 {
				t.Errorf("%s: env %q: %v", w, e.Name, errs)
			}
			if e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
				continue
			}
			ref := e.ValueFrom.SecretKeyRef
			s, ok := secrets[ref.Name]
			if !ok {
				t.Errorf("%s: env %s: no Secret %q in k8s/", w, e.Name, ref.Name)
			} else if _, ok := s.StringData[ref.Key]; !ok {
				t.Errorf("%s: env %s: Secret %s has no key %q", w, e.Name, ref.Name, ref.Key)
			}
		}
	}
}

// probePort is the port number a probe's port (a number or the name of one of the container's
// ports) stands for, as the kubelet resolves it.
func probePort(c corev1.Container, port intstr.IntOrString) (int32, error) {
	if port.Type == intstr.Int {
		if errs := validation.IsValidPortNum(int(port.IntVal)); len(errs) > 0 {
			return 0, fmt.Errorf("port %d: %v", port.IntVal, errs)
		}
		return port.IntVal, nil
	}
	for _, p := range c.Ports {
		if p.Name == port.StrVal {
			return p.ContainerPort, nil
		}
	}
	return 0, fmt.Errorf("port %q is not a port of container %s", port.StrVal, c.Name)
}
