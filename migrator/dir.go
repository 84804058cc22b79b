package migrator

import (
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
)

// LaneDecl declares a lane's name, mode and optionally its version table; its position in a
// list is its order.
type LaneDecl struct {
	Name         string
	Mode         Mode
	VersionTable string // default: lanes_<name>_version
}

// DefaultLaneDecls returns the lanes used when none are declared: "fast" (blocking) then
// "slow" (background).
func DefaultLaneDecls() []LaneDecl {
	return []LaneDecl{{Name: "fast", Mode: Blocking}, {Name: "slow", Mode: Background}}
}

// LanesFromFS returns one Lane per declared lane, each reading the subfolder of fsys named
// after it. With no declarations it uses DefaultLaneDecls() for the folders that exist. A
// subfolder that no declaration names is an error (a misspelt lane must not be skipped
// silently), and so is a declared lane without its folder.
func LanesFromFS(fsys fs.FS, decls []LaneDecl) ([]Lane, error) {
	entries, err := fs.ReadDir(fsys, ".")
	if err != nil {
		return nil, fmt.Errorf("read migrations folder: %w", err)
	}
	var folders []string
	for _, e := range entries {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			folders = append(folders, e.Name())
		}
	}
	if len(decls) == 0 {
		for _, d := range DefaultLaneDecls() {
			if slices.Contains(folders, d.Name) {
				decls = append(decls, d)
			}
		}
		if len(decls) == 0 {
			return nil, errors.New("migrations folder has neither a fast nor a slow subfolder")
		}
	}
	var lanes []Lane
	for _, d := range decls {
		if !slices.Contains(folders, d.Name) {
			return nil, &LoadError{Lane: d.Name, Err: fmt.Errorf("no folder %q in the migrations folder", d.Name)}
		}
		sub, err := fs.Sub(fsys, d.Name)
		if err != nil {
			return nil, &LoadError{Lane: d.Name, Err: err}
		}
		lanes = append(lanes, Lane{Name: d.Name, Mode: d.Mode, FS: sub, VersionTable: d.VersionTable})
	}
	for _, f := range folders {
		if !slices.ContainsFunc(decls, func(d LaneDecl) bool { return d.Name == f }) {
			return nil, fmt.Errorf("migrations folder has a subfolder %q that is not a declared lane (declared: %s)", f, declNames(decls))
		}
	}
	return lanes, nil
}

func declNames(decls []LaneDecl) string {
	names := make([]string, len(decls))
	for i, d := range decls {
		names[i] = d.Name
	}
	return strings.Join(names, ", ")
}
