package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
)

// Backup is a copy of a cluster's data directory taken while the server was stopped, for
// tests that restore a database to an earlier state as an operator would after an accident.
// It lives in the cluster's directory and goes with it.
type Backup struct {
	dir string
}

// Backup stops the server (`pg_ctl stop -m fast`, closing every connection), copies its data
// directory, and starts it again on the same port.
func (c *Cluster) Backup(ctx context.Context) (*Backup, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.removed {
		return nil, errors.New("backup cluster: cluster was stopped")
	}
	if err := c.stopLocked("fast"); err != nil {
		return nil, fmt.Errorf("backup cluster: %w", err)
	}
	b := &Backup{dir: filepath.Join(c.root, "backup-"+strconv.Itoa(c.backups))}
	c.backups++
	copyErr := copyDir(ctx, c.dataDir(), b.dir)
	if err := c.startLocked(ctx); err != nil {
		return nil, errors.Join(copyErr, err)
	}
	if copyErr != nil {
		return nil, copyErr
	}
	c.logger.Info().Int("port", c.port).Str("backup", b.dir).Msg("pgcluster: backed up")
	return b, nil
}

// Restore stops the server (closing every connection), replaces its data directory with the
// backup's and starts it again on the same port: the cluster is back as it was when the backup
// was taken, as after a restore from a backup. The backup can be restored again.
func (c *Cluster) Restore(ctx context.Context, b *Backup) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.removed {
		return errors.New("restore cluster: cluster was stopped")
	}
	if err := c.stopLocked("fast"); err != nil {
		return fmt.Errorf("restore cluster: %w", err)
	}
	if err := os.RemoveAll(c.dataDir()); err != nil {
		return fmt.Errorf("restore cluster: remove data directory: %w", err)
	}
	if err := copyDir(ctx, b.dir, c.dataDir()); err != nil {
		return fmt.Errorf("restore cluster: %w", err)
	}
	if err := c.startLocked(ctx); err != nil {
		return fmt.Errorf("restore cluster: %w", err)
	}
	c.logger.Info().Int("port", c.port).Str("backup", b.dir).Msg("pgcluster: restored")
	return nil
}

// startLocked starts the stopped server on its port. c.mu must be held.
func (c *Cluster) startLocked(ctx context.Context) error {
	c.running = true // whatever happens, let Stop and Kill try to stop it
	_, err := c.run(ctx, "pg_ctl", "start", "-w", "-t", "60", "-D", c.dataDir(), "-l", c.logFile(),
		"-o", "-p "+strconv.Itoa(c.port))
	return err
}

// copyDir copies a data directory with its owners and modes (cp -a).
func copyDir(ctx context.Context, from, to string) error {
	if out, err := exec.CommandContext(ctx, "cp", "-a", from, to).CombinedOutput(); err != nil {
		return fmt.Errorf("copy %s to %s: %s: %w", from, to, out, err)
	}
	return nil
}
