package cli

import (
	"testing"

	"github.com/multilanes/lanes/migrator"
)

func TestParseLaneDecls(t *testing.T) {
	decls, err := parseLaneDecls("fast, slow, reports:background")
	if err != nil || len(decls) != 3 || decls[0].Mode != migrator.Blocking || decls[1].Mode != migrator.Background || decls[2].Mode != migrator.Background {
		t.Fatalf("parseLaneDecls = %+v, %v", decls, err)
	}
	if decls, err := parseLaneDecls("fast:blocking:ops.fast_v,slow"); err != nil || decls[0].VersionTable != "ops.fast_v" || decls[1].VersionTable != "" {
		t.Fatalf("version table in a declaration: %+v, %v", decls, err)
	}
	for _, bad := range []string{"reports", "x:sideways", "Bad:blocking"} {
		if _, err := parseLaneDecls(bad); err == nil {
			t.Errorf("parseLaneDecls(%q) accepted", bad)
		}
	}
	if decls, err := parseLaneDecls(" "); err != nil || decls != nil {
		t.Errorf("parseLaneDecls of nothing = %+v, %v", decls, err)
	}
}
