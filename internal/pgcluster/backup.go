package pgcluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
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

// StartStandby creates a hot standby of c in a new temporary directory and starts it, returning
// once the standby accepts read-only connections; it keeps replaying c's changes while both run.
//
// The standby's data directory is an online copy of c's, taken with PostgreSQL's low-level
// backup API in non-exclusive mode (pg_backup_start and pg_backup_stop, or pg_start_backup and
// pg_stop_backup before PostgreSQL 15) and a file copy, so no pg_basebackup is needed. The
// standby streams the WAL from c through a physical replication slot created for it before the
// copy (named pgcluster_standby_<hex>; it stays on c), so c cannot recycle WAL the standby still
// needs. It listens on a free port and a socket directory of its own.
//
// The standby is a Cluster of its own: the caller must call its Stop (before or after c's). On
// failure nothing is left behind but, on c, the slot.
func (c *Cluster) StartStandby(ctx context.Context) (*Cluster, error) {
	c.mu.Lock()
	removed, port := c.removed, c.port
	c.mu.Unlock()
	if removed {
		return nil, errors.New("start standby: primary cluster was stopped")
	}
	s := &Cluster{bindir: c.bindir, cred: c.cred, logger: c.logger}
	root, err := os.MkdirTemp("", "lanes-pg-standby-")
	if err != nil {
		return nil, fmt.Errorf("create standby directory: %w", err)
	}
	s.root = root
	if err := s.createStandby(ctx, c.dataDir(), port); err != nil {
		_ = s.removeDirs()
		return nil, fmt.Errorf("start standby: %w", err)
	}
	for attempt := 1; ; attempt++ {
		err = s.startOnFreePort(ctx)
		if err == nil || attempt == 3 || !strings.Contains(err.Error(), "already in use") {
			break
		}
	}
	s.running = true
	if err != nil {
		_ = s.stopLocked("immediate")
		_ = s.removeDirs()
		return nil, fmt.Errorf("start standby: %w", err)
	}
	s.logger.Info().Int("port", s.port).Int("primary_port", port).Str("dir", root).Msg("pgcluster: standby started")
	return s, nil
}

// createStandby fills the standby's directory with an online copy of the data directory
// primaryData of the primary listening on primaryPort, and configures it as a standby of it.
func (c *Cluster) createStandby(ctx context.Context, primaryData string, primaryPort int) error {
	if err := os.Mkdir(c.sockDir(), 0o700); err != nil {
		return fmt.Errorf("create standby directory: %w", err)
	}
	if err := c.chown(c.root, c.sockDir()); err != nil {
		return err
	}
	primaryURL := (&Cluster{port: primaryPort}).ConnString("postgres")
	conn, err := pgconn.Connect(ctx, primaryURL)
	if err != nil {
		return fmt.Errorf("connect to the primary: %w", err)
	}
	// Closing the session also aborts a backup it left running.
	defer conn.Close(context.WithoutCancel(ctx))
	version, err := queryOne(ctx, conn, "show server_version_num")
	if err != nil {
		return err
	}
	v, err := strconv.Atoi(version)
	if err != nil {
		return fmt.Errorf("parse server_version_num %q: %w", version, err)
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	slot := "pgcluster_standby_" + hex.EncodeToString(b[:])
	if _, err := queryOne(ctx, conn, "select pg_create_physical_replication_slot('"+slot+"', true)::text"); err != nil {
		return err
	}
	// Non-exclusive backups: the backup label comes back from the stop call, and a backup a
	// crashed caller left running ends with its session.
	start, stop := "select pg_backup_start('pgcluster standby', true)::text",
		"select labelfile, spcmapfile from pg_backup_stop(false)"
	if v < 150000 {
		start, stop = "select pg_start_backup('pgcluster standby', true, false)::text",
			"select labelfile, spcmapfile from pg_stop_backup(false, false)"
	}
	if _, err := queryOne(ctx, conn, start); err != nil {
		return err
	}
	copyErr := copyDataDir(ctx, primaryData, c.dataDir(), c.chown)
	res, err := conn.Exec(ctx, stop).ReadAll()
	if err == nil && (len(res) != 1 || len(res[0].Rows) != 1 || len(res[0].Rows[0]) != 2) {
		err = errors.New("unexpected answer")
	}
	if err != nil {
		return errors.Join(copyErr, fmt.Errorf("%s: %w", stop, err))
	}
	if copyErr != nil {
		return copyErr
	}
	label, spcmap := res[0].Rows[0][0], res[0].Rows[0][1]
	files := [][2]string{{"backup_label", string(label)}, {"standby.signal", ""}}
	if len(spcmap) > 0 {
		files = append(files, [2]string{"tablespace_map", string(spcmap)})
	}
	for _, f := range files {
		path := filepath.Join(c.dataDir(), f[0])
		if err := os.WriteFile(path, []byte(f[1]), 0o600); err != nil {
			return fmt.Errorf("write standby %s: %w", f[0], err)
		}
		if err := c.chown(path); err != nil {
			return err
		}
	}
	// The copied postgresql.conf names the primary's socket directory: the last setting wins.
	conninfo := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres application_name=%s", primaryPort, slot)
	f, err := os.OpenFile(filepath.Join(c.dataDir(), "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open standby postgresql.conf: %w", err)
	}
	if _, err := fmt.Fprintf(f, "\n# pgcluster standby settings\nunix_socket_directories = %s\nhot_standby = on\nprimary_conninfo = %s\nprimary_slot_name = %s\n",
		quoteConf(c.sockDir()), quoteConf(conninfo), quoteConf(slot)); err != nil {
		f.Close()
		return fmt.Errorf("write standby postgresql.conf: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write standby postgresql.conf: %w", err)
	}
	return nil
}

// queryOne runs a query that returns one value and returns it as text.
func queryOne(ctx context.Context, conn *pgconn.PgConn, sql string) (string, error) {
	res, err := conn.Exec(ctx, sql).ReadAll()
	if err != nil {
		return "", fmt.Errorf("%s: %w", sql, err)
	}
	if len(res) != 1 || len(res[0].Rows) != 1 || len(res[0].Rows[0]) != 1 {
		return "", fmt.Errorf("%s: unexpected answer", sql)
	}
	return string(res[0].Rows[0][0]), nil
}

// chown gives paths to the user the server runs as, when that is not the calling user.
func (c *Cluster) chown(paths ...string) error {
	if c.cred == nil {
		return nil
	}
	for _, p := range paths {
		if err := os.Lchown(p, int(c.cred.Uid), int(c.cred.Gid)); err != nil {
			return fmt.Errorf("give %s to user postgres: %w", p, err)
		}
	}
	return nil
}

// Top-level entries of a data directory a base backup leaves out (as pg_basebackup does): the
// running server's own files, and directories whose contents the server rebuilds or the standby
// receives otherwise (pg_wal streams from the primary).
var (
	skipFiles = map[string]bool{
		"postmaster.pid": true, "postmaster.opts": true, "backup_label": true, "backup_label.old": true,
		"tablespace_map": true, "standby.signal": true, "recovery.signal": true, "current_logfiles": true,
	}
	emptyDirs = map[string]bool{
		"pg_wal": true, "pg_replslot": true, "pg_dynshmem": true, "pg_notify": true, "pg_serial": true,
		"pg_snapshots": true, "pg_stat_tmp": true, "pg_subtrans": true,
	}
)

// copyDataDir copies the data directory of a running server from src to dst (which must not
// exist), keeping modes and giving every copy to the server's user with chown. Files the server
// removes during the copy are left out, as are the entries a base backup leaves out; pg_wal is
// created empty, with its archive_status directory.
func copyDataDir(ctx context.Context, src, dst string, chown func(...string) error) error {
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed by the server during the copy
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		parts := strings.Split(rel, string(filepath.Separator))
		if len(parts) == 1 && skipFiles[rel] || len(parts) > 1 && emptyDirs[parts[0]] ||
			strings.HasPrefix(d.Name(), "pgsql_tmp") {
			if d.IsDir() && rel != "." {
				return filepath.SkipDir
			}
			return nil
		}
		to := filepath.Join(dst, rel)
		info, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		} else if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			if err := os.Mkdir(to, info.Mode().Perm()); err != nil {
				return err
			}
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(path)
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			} else if err != nil {
				return err
			}
			if err := os.Symlink(target, to); err != nil {
				return err
			}
		case d.Type().IsRegular():
			if err := copyFile(path, to, info.Mode().Perm()); errors.Is(err, fs.ErrNotExist) {
				return nil
			} else if err != nil {
				return err
			}
		default:
			return nil // sockets and the like
		}
		return chown(to)
	})
	if err == nil {
		status := filepath.Join(dst, "pg_wal", "archive_status")
		if err = os.Mkdir(status, 0o700); err == nil {
			err = chown(status)
		}
	}
	if err != nil {
		return fmt.Errorf("copy data directory %s to %s: %w", src, dst, err)
	}
	return nil
}

// copyFile copies the regular file from to the new file to with mode perm.
func copyFile(from, to string, perm fs.FileMode) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
