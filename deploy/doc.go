// Package deploy holds the tests of the deploy recipes: the Dockerfile at the repository's root
// and the Kubernetes manifests in k8s/. It is a module of its own so that the library's go.mod
// does not carry the Kubernetes API types.
package deploy
