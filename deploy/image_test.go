package deploy

// The Dockerfile built and run, and the manifests' pods played with the built image against a
// real PostgreSQL, as far as that goes without a Kubernetes cluster.
//
// No image is pulled when the PostgreSQL image is local: the Dockerfile's base images are build
// arguments, and the test gives it stand-ins. The builder is a Debian root (the PostgreSQL image,
// LANES_TEST_PG_IMAGE, default postgres:15, is one) with the host's Go toolchain, module
// downloads and a build cache warmed by the same `go build` on the host (LANES_TEST_GO_IMAGE
// names a real Go image instead); the runtime is `scratch` (LANES_TEST_RUNTIME_IMAGE names
// another), which is why the Dockerfile copies the builder's CA bundle.
//
// A pod is played the way the kubelet runs one: a sandbox container owns the pod's network
// namespace and every container of the pod joins it; commands, arguments, environment (secret
// references resolved from a Secret with the keys of k8s/secret.yaml), security context,
// memory limit, ports and probes are read from the manifests; probes are HTTP GETs from the host
// to the pod's IP, passing on a status from 200 to 399; init containers run to completion in
// order, a sidecar (restartPolicy Always) until its startup probe passes, then the containers
// start. The database runs in a container on the pods' network, reached as host "db".

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	corev1 "k8s.io/api/core/v1"
)

// The image names the manifests use, and what the test runs for each.
const (
	lanesImageName  = "registry.example.com/shop-lanes:1.4.0"  // the lanes image with the migrations
	workerImageName = "registry.example.com/shop-worker:1.4.0" // a service's own image: a stand-in
	appImageName    = "registry.example.com/shop-app:1.4.0"    // a service's own image: a stand-in
)

// slowGate is the advisory lock the slow lane's migration waits for: the test holds it to keep
// the lane running while it looks at the pods.
const slowGate = 7_340_077

// testMigrations are the lanes baked into the test's shop-lanes image.
var testMigrations = map[string]string{
	"fast/001_items.sql": "create table items (id int primary key, note text not null);",
	"fast/002_seed.sql":  "insert into items select g, 'seed-' || g from generate_series(1, 10) g;",
	"slow/001_checked.sql": fmt.Sprintf("select pg_advisory_xact_lock(%d);\n"+
		"alter table items add column checked boolean not null default false;", slowGate),
}

func TestImageAndPodLifecycle(t *testing.T) {
	d := requireDocker(t)
	m := loadManifests(t)
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	id := randomHex()
	debian := envOr("LANES_TEST_PG_IMAGE", "postgres:15") // a Debian root, as pgtest's default

	// The Dockerfile, built with stand-in base images.
	began := time.Now()
	goImage := os.Getenv("LANES_TEST_GO_IMAGE")
	if goImage == "" {
		goImage = d.goBuilder(t, repo, debian)
	}
	t.Logf("builder image %s ready after %s", goImage, time.Since(began).Round(time.Second))
	began = time.Now()
	image := "lanes-test:" + id
	out := d.must(t, 60*time.Minute, "build", "--build-arg", "GO_IMAGE="+goImage,
		"--build-arg", "RUNTIME_IMAGE="+envOr("LANES_TEST_RUNTIME_IMAGE", "scratch"),
		"-t", image, "-f", filepath.Join(repo, "Dockerfile"), repo)
	t.Cleanup(func() { d.removeIntermediates(out) })
	t.Cleanup(func() { d.quiet("rmi", "-f", image) })
	t.Logf("docker build of the Dockerfile took %s", time.Since(began).Round(time.Second))

	var cfg []struct {
		Size   int64
		Config struct {
			User       string
			Entrypoint []string
			Cmd        []string
			Env        []string
		}
	}
	if err := json.Unmarshal([]byte(d.must(t, time.Minute, "image", "inspect", image)), &cfg); err != nil || len(cfg) != 1 {
		t.Fatalf("image inspect: %v", err)
	}
	c := cfg[0].Config
	t.Logf("image %s: %.1f MB, user %q, entrypoint %q, cmd %q, env %q", image, float64(cfg[0].Size)/1e6, c.User, c.Entrypoint, c.Cmd, c.Env)
	if uid, _, _ := strings.Cut(c.User, ":"); uid == "" || uid == "0" || strings.Trim(uid, "0123456789") != "" {
		t.Errorf("image user %q: want a numeric non-root user (Kubernetes' runAsNonRoot checks it)", c.User)
	}
	if cfg[0].Size > 40e6 {
		t.Errorf("image is %d bytes; a static binary on a minimal base should stay under 40 MB", cfg[0].Size)
	}
	if out := d.must(t, time.Minute, "run", "--rm", image, "--version"); !strings.HasPrefix(out, "lanes ") {
		t.Errorf("lanes --version in the image printed %q", out)
	}
	// The CA bundle is in the image (TLS to a managed database with sslmode=verify-full).
	probe := d.must(t, time.Minute, "create", image)
	certs := filepath.Join(t.TempDir(), "ca.crt")
	d.must(t, time.Minute, "cp", strings.TrimSpace(probe)+":/etc/ssl/certs/ca-certificates.crt", certs)
	d.quiet("rm", "-f", strings.TrimSpace(probe))
	if b, err := os.ReadFile(certs); err != nil || !bytes.Contains(b, []byte("BEGIN CERTIFICATE")) {
		t.Errorf("no CA bundle in the image: %v", err)
	}
	// Migrations mounted into the bare image: validate reads them without a database.
	mdir := t.TempDir()
	writeTree(t, filepath.Join(mdir, "migrations"), testMigrations)
	if out, err := d.run(time.Minute, "run", "--rm", "-v", filepath.Join(mdir, "migrations")+":/migrations:ro", image, "validate"); err != nil {
		t.Errorf("lanes validate with the migrations mounted at /migrations: %v\n%s", err, out)
	}
	// Migrations copied: the image the manifests name, built FROM the lanes image.
	shop := "lanes-test-shop:" + id
	if err := os.WriteFile(filepath.Join(mdir, "Dockerfile"), []byte("FROM "+image+"\nCOPY migrations /migrations\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d.must(t, 10*time.Minute, "build", "-t", shop, mdir)
	t.Cleanup(func() { d.quiet("rmi", "-f", shop) })

	// The database, on the pods' network.
	network := "lanes-test-" + id
	d.must(t, time.Minute, "network", "create", network)
	t.Cleanup(func() { d.quiet("network", "rm", network) })
	db := "lanes-test-db-" + id
	d.must(t, time.Minute, "run", "-d", "--name", db, "--network", network, "--network-alias", "db",
		"-e", "POSTGRES_PASSWORD=admin-pw", "-p", "127.0.0.1::5432", debian)
	t.Cleanup(func() { d.quiet("rm", "-f", "-v", db) })
	hostPort := strings.TrimSpace(d.must(t, time.Minute, "port", db, "5432/tcp"))
	hostPort = hostPort[strings.LastIndex(hostPort, ":")+1:]
	adminURL := "postgres://postgres:admin-pw@127.0.0.1:" + hostPort + "/postgres?sslmode=disable"
	admin := connectRetry(t, adminURL)
	for _, q := range []string{
		"create role shop_owner login password 'owner-pw'",
		"create role shop_reader login password 'reader-pw'",
		"create database shop owner shop_owner",
	} {
		exec1(t, admin, q)
	}
	shopAdmin := connectRetry(t, strings.Replace(adminURL, "/postgres?", "/shop?", 1))
	// docs/deploy.md's reader: SELECT on every table the owner creates, nothing else.
	exec1(t, shopAdmin, "alter default privileges for role shop_owner grant select on tables to shop_reader")
	secret := map[string]string{
		"owner-url":  "postgres://shop_owner:owner-pw@db:5432/shop?sslmode=disable",
		"reader-url": "postgres://shop_reader:reader-pw@db:5432/shop?sslmode=disable",
	}
	for key := range m.secrets["shop-db"].StringData {
		if _, ok := secret[key]; !ok {
			t.Fatalf("k8s/secret.yaml has key %q, which the test does not fill", key)
		}
	}
	env := &podEnv{d: d, id: id, network: network, debian: debian, secret: secret,
		images: map[string]string{lanesImageName: shop, workerImageName: "", appImageName: ""}}

	// 1. The Job applies the fast lane and exits 0.
	job := m.jobs["shop-migrate-1-4-0"]
	jp := env.newPod(t, "job", &job.Spec.Template.Spec)
	jp.start(t, jp.spec.Containers[0])
	if code := jp.exitCode(t, "migrate", 5*time.Minute); code != 0 {
		t.Fatalf("the Job's container exited %d\n%s", code, jp.logs("migrate"))
	}
	if v := scalar[int32](t, shopAdmin, "select version from lanes_fast_version"); v != 2 {
		t.Fatalf("after the Job the fast lane is at version %d, want 2", v)
	}
	if n := scalar[int](t, shopAdmin, "select count(*) from lanes_history where lane = 'slow'"); n != 0 {
		t.Fatalf("the Job (--lane fast) touched the slow lane: %d history rows", n)
	}

	// The slow lane's migration waits for the gate until the test lets it go.
	gate := connectRetry(t, strings.Replace(adminURL, "/postgres?", "/shop?", 1))
	exec1(t, gate, fmt.Sprintf("select pg_advisory_lock(%d)", slowGate))

	// 2. The worker's init container waits for the slow lane, as the reader role.
	worker := m.deployments["shop-worker"]
	wp := env.newPod(t, "worker", &worker.Spec.Template.Spec)
	initC := wp.spec.InitContainers[0]
	wp.start(t, initC)
	wp.awaitLog(t, initC.Name, "waiting for the lane through LISTEN/NOTIFY", 2*time.Minute)

	// 3. The Deployment's container serves its probes on the declared port and paths.
	lanes := m.deployments["shop-lanes"]
	lp := env.newPod(t, "lanes", &lanes.Spec.Template.Spec)
	lc := lp.spec.Containers[0]
	lp.start(t, lc)
	lp.awaitProbe(t, lc, "startup", lc.StartupProbe)
	lp.expectProbe(t, lc, "readiness", lc.ReadinessProbe)
	lp.expectProbe(t, lc, "liveness", lc.LivenessProbe)
	ann := lanes.Spec.Template.Annotations
	if code, body := lp.get(t, ann["prometheus.io/port"], ann["prometheus.io/path"]); code != 200 || !strings.Contains(body, "lanes_lane_done") {
		t.Errorf("the scrape annotations' %s:%s answered %d:\n%.300s", ann["prometheus.io/port"], ann["prometheus.io/path"], code, body)
	}
	if uid := lp.uid(t, lc.Name); uid == 0 {
		t.Errorf("the lanes process runs as root")
	}

	// 4. The sidecar form: the app container starts once the sidecar's startup probe passes.
	app := m.deployments["shop-app"]
	ap := env.newPod(t, "app", &app.Spec.Template.Spec)
	side := ap.spec.InitContainers[0]
	if side.RestartPolicy == nil || *side.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Fatalf("sidecar.yaml: the lanes init container is not a sidecar")
	}
	ap.start(t, side)
	ap.awaitProbe(t, side, "startup", side.StartupProbe)
	for _, c := range ap.spec.Containers {
		ap.start(t, c)
		if c.ReadinessProbe != nil {
			ap.awaitProbe(t, c, "readiness", c.ReadinessProbe)
		}
	}
	ap.expectProbe(t, side, "liveness", side.LivenessProbe)

	// Both replicas are ready while the slow lane is held: the worker still waits.
	if !wp.running(t, initC.Name) {
		t.Fatalf("the worker's init container ended before the slow lane was applied:\n%s", wp.logs(initC.Name))
	}
	if n := scalar[int](t, shopAdmin, "select count(*) from lanes_history where lane = 'slow' and error is null"); n != 0 {
		t.Fatalf("the slow lane was applied while its gate was held")
	}

	// 5. The slow lane is applied: the init container exits 0 and the worker starts.
	if err := gate.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if code := wp.exitCode(t, initC.Name, 5*time.Minute); code != 0 {
		t.Fatalf("the worker's init container exited %d\n%s", code, wp.logs(initC.Name))
	}
	for _, c := range wp.spec.Containers {
		wp.start(t, c)
		if !wp.running(t, c.Name) {
			t.Fatalf("worker container %s is not running", c.Name)
		}
	}
	if v := scalar[int32](t, shopAdmin, "select version from lanes_slow_version"); v != 1 {
		t.Fatalf("the slow lane is at version %d, want 1", v)
	}
	if n := scalar[int](t, shopAdmin, "select count(*) from (select lane, version from lanes_history where error is null group by 1, 2 having count(*) <> 1) x"); n != 0 {
		t.Fatalf("%d migrations applied more than once", n)
	}

	// 6. SIGTERM with the pod's grace period: both replicas stop cleanly.
	lp.expectStop(t, lc.Name, lanes.Spec.Template.Spec.TerminationGracePeriodSeconds)
	ap.expectStop(t, side.Name, app.Spec.Template.Spec.TerminationGracePeriodSeconds)
}

// docker runs the docker client.
type docker struct{ bin string }

// requireDocker returns the client of a Docker engine that answers, or skips the test; under
// LANES_TEST_REQUIRE_DB=1 (CI) a missing engine fails it.
func requireDocker(t *testing.T) docker {
	t.Helper()
	d := docker{bin: os.Getenv("LANES_TEST_DOCKER")}
	if d.bin == "" {
		d.bin = "docker"
		if runtime.GOOS == "linux" {
			// Debian's docker.io client builds with the classic builder, which needs no plugin.
			if _, err := os.Stat("/usr/bin/docker"); err == nil {
				d.bin = "/usr/bin/docker"
			}
		}
	}
	if out, err := d.run(30*time.Second, "info", "--format", "{{.ServerVersion}}"); err != nil {
		if os.Getenv("LANES_TEST_REQUIRE_DB") == "1" {
			t.Fatalf("no Docker engine answers (%s info: %v: %s); LANES_TEST_REQUIRE_DB=1 forbids skipping", d.bin, err, out)
		}
		t.Skipf("no Docker engine answers: %v", err)
	}
	return d
}

// run runs one docker command, bounded by timeout, and returns its combined output.
func (d docker) run(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, d.bin, args...)
	cmd.Env = append(os.Environ(), "DOCKER_BUILDKIT=0")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("%w (still running after %s)", err, timeout)
	}
	return out.String(), err
}

// must runs a docker command and fails the test when it fails.
func (d docker) must(t *testing.T, timeout time.Duration, args ...string) string {
	t.Helper()
	out, err := d.run(timeout, args...)
	if err != nil {
		t.Fatalf("docker %s: %v\n%s", strings.Join(args, " "), err, tail(out, 3000))
	}
	return out
}

// stepImage is a step's image in the classic builder's output.
var stepImage = regexp.MustCompile(`(?m)^ ---> ([0-9a-f]{12})$`)

// removeIntermediates removes the untagged images a build's steps left (the builder stage,
// over a gigabyte each time), newest first, sparing the tagged base images.
func (d docker) removeIntermediates(buildOutput string) {
	ids := stepImage.FindAllStringSubmatch(buildOutput, -1)
	for i := len(ids) - 1; i >= 0; i-- {
		if tags, err := d.run(time.Minute, "image", "inspect", "-f", "{{len .RepoTags}}", ids[i][1]); err == nil && strings.TrimSpace(tags) == "0" {
			d.quiet("rmi", ids[i][1])
		}
	}
}

// quiet runs a cleanup command whose failure does not matter.
func (d docker) quiet(args ...string) { _, _ = d.run(2*time.Minute, args...) }

// goBuilder makes the stand-in Go builder image, or reuses the one made for the same Go
// version, go.sum and Debian root: the Debian root plus the host's Go toolchain, its module
// downloads and a build cache warmed by the Dockerfile's own build command run on the host, so
// the image's build compiles little. The image is kept, as the PostgreSQL image is.
func (d docker) goBuilder(t *testing.T, repo, debian string) string {
	t.Helper()
	sum, err := os.ReadFile(filepath.Join(repo, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256([]byte(goEnv(t, "GOVERSION") + "\n" + debian + "\n" + string(sum)))
	tag := "lanes-test-gobuilder:" + hex.EncodeToString(h[:6])
	if _, err := d.run(time.Minute, "image", "inspect", tag); err == nil {
		return tag
	}
	goroot := strings.TrimSpace(goEnv(t, "GOROOT"))
	modcache := strings.TrimSpace(goEnv(t, "GOMODCACHE"))
	cache := os.Getenv("LANES_TEST_IMAGE_GOCACHE")
	if cache == "" {
		dir, err := os.UserCacheDir()
		if err != nil {
			dir = os.TempDir()
		}
		cache = filepath.Join(dir, "lanes-image-gocache")
	}
	// The Dockerfile's command, with the same flags, so the container's build finds its work done.
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(t.TempDir(), "lanes"), ".")
	build.Dir = repo
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOCACHE="+cache)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build on the host: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	tarCmd := exec.CommandContext(ctx, "tar", "-c", "--absolute-names",
		"--transform", "s,^"+strings.TrimPrefix(goroot, "/")+",usr/local/go,",
		"--transform", "s,^"+strings.TrimPrefix(modcache, "/")+",root/go/pkg/mod,",
		"--transform", "s,^"+strings.TrimPrefix(cache, "/")+",root/.cache/go-build,",
		"-C", "/", strings.TrimPrefix(goroot, "/"), strings.TrimPrefix(filepath.Join(modcache, "cache", "download"), "/"),
		strings.TrimPrefix(cache, "/"), "etc/ssl/certs/ca-certificates.crt")
	toolchain := tag + "-toolchain"
	imp := exec.CommandContext(ctx, d.bin, "import", "-", toolchain)
	pipe, err := tarCmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	imp.Stdin = pipe
	var tarErr, impOut bytes.Buffer
	tarCmd.Stderr, imp.Stdout, imp.Stderr = &tarErr, &impOut, &impOut
	if err := tarCmd.Start(); err != nil {
		t.Fatal(err)
	}
	impErr := imp.Run()
	if err := tarCmd.Wait(); err != nil || impErr != nil {
		t.Fatalf("docker import of the Go toolchain: tar: %v %s; import: %v %s", err, tarErr.String(), impErr, impOut.String())
	}
	t.Cleanup(func() { d.quiet("rmi", "-f", toolchain) })
	dir := t.TempDir()
	df := "FROM " + toolchain + " AS toolchain\nFROM " + debian + "\nCOPY --from=toolchain / /\n" +
		"ENV PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin GOTOOLCHAIN=local\n" +
		"ENTRYPOINT []\nCMD [\"go\", \"version\"]\n"
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(df), 0o644); err != nil {
		t.Fatal(err)
	}
	d.must(t, 20*time.Minute, "build", "-t", tag, dir)
	return tag
}

func goEnv(t *testing.T, name string) string {
	out, err := exec.Command("go", "env", name).Output()
	if err != nil {
		t.Fatalf("go env %s: %v", name, err)
	}
	return string(out)
}

// podEnv is what the pods of one test share: the engine, the network, the images and the Secret.
type podEnv struct {
	d       docker
	id      string
	network string
	debian  string            // the stand-in for a service's own image (sleeps)
	images  map[string]string // manifest image → local image; "" runs the stand-in
	secret  map[string]string // the shop-db Secret
}

// pod is one pod being played: a sandbox holding its network namespace, and its containers.
type pod struct {
	env     *podEnv
	name    string
	spec    *corev1.PodSpec
	sandbox string
	ip      string
}

func (e *podEnv) newPod(t *testing.T, name string, spec *corev1.PodSpec) *pod {
	t.Helper()
	p := &pod{env: e, name: "lanes-test-" + e.id + "-" + name, spec: spec}
	p.sandbox = p.name + "-sandbox"
	e.d.must(t, time.Minute, "run", "-d", "--name", p.sandbox, "--network", e.network, "--entrypoint", "sleep", e.debian, "infinity")
	t.Cleanup(func() { e.d.quiet("rm", "-f", p.sandbox) })
	p.ip = strings.TrimSpace(e.d.must(t, time.Minute, "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", p.sandbox))
	return p
}

// start starts container c of the pod as the kubelet would.
func (p *pod) start(t *testing.T, c corev1.Container) {
	t.Helper()
	image, ok := p.env.images[c.Image]
	if !ok {
		t.Fatalf("pod %s: container %s: image %q is not one the test knows", p.name, c.Name, c.Image)
	}
	args := []string{"run", "-d", "--name", p.name + "-" + c.Name, "--network", "container:" + p.sandbox}
	for _, e := range c.Env {
		v := e.Value
		if e.ValueFrom != nil {
			ref := e.ValueFrom.SecretKeyRef
			if ref == nil || ref.Name != "shop-db" {
				t.Fatalf("pod %s: container %s: env %s: only the shop-db Secret is played", p.name, c.Name, e.Name)
			}
			if v, ok = p.env.secret[ref.Key]; !ok {
				t.Fatalf("pod %s: container %s: env %s: no key %q in the Secret", p.name, c.Name, e.Name, ref.Key)
			}
		}
		args = append(args, "-e", e.Name+"="+v)
	}
	if sc := c.SecurityContext; sc != nil {
		if sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem {
			args = append(args, "--read-only")
		}
		if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
			args = append(args, "--security-opt", "no-new-privileges")
		}
		if sc.Capabilities != nil {
			for _, cp := range sc.Capabilities.Drop {
				args = append(args, "--cap-drop", string(cp))
			}
		}
		if sc.RunAsUser != nil {
			args = append(args, "--user", strconv.FormatInt(*sc.RunAsUser, 10))
		}
	}
	if mem := c.Resources.Limits.Memory(); !mem.IsZero() {
		args = append(args, "--memory", strconv.FormatInt(mem.Value(), 10))
	}
	nonRoot := p.spec.SecurityContext != nil && p.spec.SecurityContext.RunAsNonRoot != nil && *p.spec.SecurityContext.RunAsNonRoot
	if image == "" {
		// A service's own image: a stand-in that sleeps, as a non-root user.
		args = append(args, "--user", "65532", "--entrypoint", "sleep", p.env.debian, "infinity")
	} else {
		if nonRoot && (c.SecurityContext == nil || c.SecurityContext.RunAsUser == nil) {
			// The kubelet refuses to start a container whose image user is root or a name.
			user := strings.TrimSpace(p.env.d.must(t, time.Minute, "image", "inspect", "-f", "{{.Config.User}}", image))
			if uid, _, _ := strings.Cut(user, ":"); uid == "" || uid == "0" || strings.Trim(uid, "0123456789") != "" {
				t.Fatalf("pod %s: container %s: runAsNonRoot, and image %s runs as %q", p.name, c.Name, image, user)
			}
		}
		rest := c.Args
		if len(c.Command) > 0 {
			args = append(args, "--entrypoint", c.Command[0])
			rest = append(c.Command[1:len(c.Command):len(c.Command)], c.Args...)
		}
		args = append(append(args, image), rest...)
	}
	p.env.d.must(t, time.Minute, args...)
	t.Cleanup(func() { p.env.d.quiet("rm", "-f", p.name+"-"+c.Name) })
}

// exitCode waits for the container to end and returns its exit code.
func (p *pod) exitCode(t *testing.T, name string, guard time.Duration) int {
	t.Helper()
	out, err := p.env.d.run(guard, "wait", p.name+"-"+name)
	if err != nil {
		t.Fatalf("pod %s: container %s did not end: %v %s\n%s", p.name, name, err, out, p.logs(name))
	}
	code, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("docker wait: %q", out)
	}
	return code
}

func (p *pod) running(t *testing.T, name string) bool {
	t.Helper()
	return strings.TrimSpace(p.env.d.must(t, time.Minute, "inspect", "-f", "{{.State.Running}}", p.name+"-"+name)) == "true"
}

func (p *pod) logs(name string) string {
	out, _ := p.env.d.run(time.Minute, "logs", p.name+"-"+name)
	return tail(out, 4000)
}

// uid is the real user id of the container's first process, read from the host's /proc.
func (p *pod) uid(t *testing.T, name string) int {
	t.Helper()
	pid := strings.TrimSpace(p.env.d.must(t, time.Minute, "inspect", "-f", "{{.State.Pid}}", p.name+"-"+name))
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if f := strings.Fields(line); len(f) > 1 && f[0] == "Uid:" {
			uid, _ := strconv.Atoi(f[1])
			return uid
		}
	}
	t.Fatalf("no Uid in /proc/%s/status", pid)
	return 0
}

// awaitLog waits until the container's log holds want, failing if it ends first.
func (p *pod) awaitLog(t *testing.T, name, want string, guard time.Duration) {
	t.Helper()
	deadline := time.Now().Add(guard)
	for {
		if strings.Contains(p.logs(name), want) {
			return
		}
		if !p.running(t, name) {
			t.Fatalf("pod %s: container %s ended before logging %q:\n%s", p.name, name, want, p.logs(name))
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s: container %s did not log %q within %s:\n%s", p.name, name, want, guard, p.logs(name))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// get sends the kubelet's GET to the pod's IP; port is a number.
func (p *pod) get(t *testing.T, port, path string) (int, string) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get((&url.URL{Scheme: "http", Host: p.ip + ":" + port, Path: path}).String())
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(body)
}

// probeOnce runs the HTTP probe once: the port resolved as the kubelet does (a name is one of
// the container's ports), and a status from 200 to 399 passes.
func (p *pod) probeOnce(t *testing.T, c corev1.Container, pr *corev1.Probe) (bool, string) {
	t.Helper()
	port, err := probePort(c, pr.HTTPGet.Port)
	if err != nil {
		t.Fatal(err)
	}
	code, body := p.get(t, strconv.Itoa(int(port)), pr.HTTPGet.Path)
	return code >= 200 && code < 400, fmt.Sprintf("GET %s:%d%s: %d %.200s", p.ip, port, pr.HTTPGet.Path, code, body)
}

// awaitProbe runs the probe every period until it passes, for at most its failureThreshold
// periods (a hang guard of at least 5 minutes under load, whatever the manifest says).
func (p *pod) awaitProbe(t *testing.T, c corev1.Container, kind string, pr *corev1.Probe) {
	t.Helper()
	if pr == nil {
		t.Fatalf("pod %s: container %s has no %s probe", p.name, c.Name, kind)
	}
	period := time.Duration(max(pr.PeriodSeconds, 1)) * time.Second
	guard := max(time.Duration(max(pr.FailureThreshold, 3))*period, 5*time.Minute)
	deadline := time.Now().Add(guard)
	for {
		ok, what := p.probeOnce(t, c, pr)
		if ok {
			t.Logf("pod %s: container %s: %s probe passed: %s", p.name, c.Name, kind, what)
			return
		}
		if !p.running(t, c.Name) {
			t.Fatalf("pod %s: container %s ended before its %s probe passed (%s):\n%s", p.name, c.Name, kind, what, p.logs(c.Name))
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s: container %s: %s probe still failing after %s: %s\n%s", p.name, c.Name, kind, guard, what, p.logs(c.Name))
		}
		time.Sleep(min(period, time.Second))
	}
}

// expectProbe runs the probe once and fails the test unless it passes.
func (p *pod) expectProbe(t *testing.T, c corev1.Container, kind string, pr *corev1.Probe) {
	t.Helper()
	if pr == nil {
		t.Fatalf("pod %s: container %s has no %s probe", p.name, c.Name, kind)
	}
	if ok, what := p.probeOnce(t, c, pr); !ok {
		t.Errorf("pod %s: container %s: %s probe fails: %s", p.name, c.Name, kind, what)
	}
}

// expectStop sends SIGTERM with the pod's grace period (SIGKILL after it) and expects exit 0.
func (p *pod) expectStop(t *testing.T, name string, grace *int64) {
	t.Helper()
	g := int64(30) // the Kubernetes default
	if grace != nil {
		g = *grace
	}
	p.env.d.must(t, time.Duration(g)*time.Second+2*time.Minute, "stop", "-t", strconv.FormatInt(g, 10), p.name+"-"+name)
	if code := p.exitCode(t, name, time.Minute); code != 0 {
		t.Errorf("pod %s: container %s exited %d on SIGTERM:\n%s", p.name, name, code, p.logs(name))
	}
}

// connectRetry connects, retrying while the server starts (a hang guard of 2 minutes).
func connectRetry(t *testing.T, u string) *pgx.Conn {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		conn, err := pgx.Connect(ctx, u)
		cancel()
		if err == nil {
			t.Cleanup(func() { conn.Close(context.Background()) })
			return conn
		}
		if time.Now().After(deadline) {
			t.Fatalf("connect to the test database: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func exec1(t *testing.T, conn *pgx.Conn, sql string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := conn.Exec(ctx, sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func scalar[T any](t *testing.T, conn *pgx.Conn, sql string) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var v T
	if err := conn.QueryRow(ctx, sql).Scan(&v); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return v
}

func writeTree(t *testing.T, root string, files map[string]string) {
	t.Helper()
	for name, body := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func randomHex() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
