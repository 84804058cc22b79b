package migrator

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/multilanes/lanes/internal/session"
)

// fileSampleDelay is how long a migration that is not batched runs before the applier starts
// sampling what the server says about it: shorter ones cost nothing.
const fileSampleDelay = time.Second

// sampleFile reports the progress of a migration that is not batched, of a background lane,
// while it runs on conn: after fileSampleDelay, on a connection of its own, at most once a
// second, it reads what the server knows of the applying session's statement (the phase and
// blocks of an index build from pg_stat_progress_create_index; likewise CLUSTER and VACUUM
// FULL, VACUUM, ANALYZE and COPY; a lock wait), records it in the progress table with the
// elapsed time and announces it. The returned function stops it and marks the record finished;
// call it once the migration has committed or failed.
func (m *Migrator) sampleFile(ctx context.Context, conn *pgx.Conn, l *loadedLane, mig *Migration, start time.Time) (stop func()) {
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	pid := session.BackendPID(conn.PgConn())
	go func() {
		defer close(done)
		t := time.NewTimer(fileSampleDelay)
		defer t.Stop()
		select {
		case <-sctx.Done():
			return
		case <-t.C:
		}
		sc, err := m.connect(sctx)
		if err != nil {
			m.cfg.Logger.Debug().Err(err).Str("lane", l.Name).Msg("cannot sample the migration's progress")
			return
		}
		wrote := false
		defer func() {
			if wrote {
				fctx, fcancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, _ = sc.Exec(fctx, "update "+m.progressTable().Quoted()+" set finished_at = now() where lane = $1 and version = $2 and finished_at is null", l.Name, mig.Version)
				fcancel()
			}
			cctx, ccancel := context.WithTimeout(context.Background(), time.Second)
			_ = sc.Close(cctx)
			ccancel()
		}()
		for {
			if err := m.sampleOnce(sctx, sc, pid, l, mig, start); err != nil {
				if sctx.Err() == nil {
					m.cfg.Logger.Debug().Err(err).Str("lane", l.Name).Msg("cannot sample the migration's progress")
				}
			} else {
				wrote = true
			}
			t.Reset(time.Second)
			select {
			case <-sctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

// sampleOnce reads the server's progress views for the applying session pid, records the
// result and announces it.
func (m *Migrator) sampleOnce(ctx context.Context, sc *pgx.Conn, pid uint32, l *loadedLane, mig *Migration, start time.Time) error {
	var (
		phase       string
		done, total int64
	)
	// pg_stat_progress_copy exists from PostgreSQL 14 on.
	copyProgress := ""
	if v, err := session.ServerVersion(ctx, sc.PgConn()); err == nil && v >= 140000 {
		copyProgress = `
  union all select 5, lower(command) || ': ' || tuples_processed || ' tuples', 0, 0 from pg_stat_progress_copy where pid = $1`
	}
	err := sc.QueryRow(ctx, `select phase, done, total from (
  select 1 o, 'create index: ' || phase phase, coalesce(blocks_done, 0) done, coalesce(blocks_total, 0) total from pg_stat_progress_create_index where pid = $1
  union all select 2, lower(command) || ': ' || phase, heap_blks_scanned, heap_blks_total from pg_stat_progress_cluster where pid = $1
  union all select 3, 'vacuum: ' || phase, heap_blks_scanned, heap_blks_total from pg_stat_progress_vacuum where pid = $1
  union all select 4, 'analyze: ' || phase, sample_blks_scanned, sample_blks_total from pg_stat_progress_analyze where pid = $1`+copyProgress+`
  union all select 6, 'waiting for a lock (' || wait_event || ')', 0, 0 from pg_stat_activity where pid = $1 and wait_event_type = 'Lock'
  union all select 7, 'running', 0, 0
) p order by o limit 1`, int32(pid)).Scan(&phase, &done, &total)
	if err != nil {
		return err
	}
	now := m.cfg.Now()
	elapsed := now.Sub(start).Round(time.Second).Seconds()
	b := &pgx.Batch{}
	b.Queue("insert into "+m.progressTable().Quoted()+` (lane, version, file, checksum, done, total, phase, started_at, updated_at)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
on conflict (lane, version) do update set file = excluded.file, checksum = excluded.checksum, done = excluded.done, total = excluded.total,
  phase = excluded.phase, started_at = excluded.started_at, updated_at = excluded.updated_at, finished_at = null, cursor = '', batches = 0`,
		l.Name, mig.Version, mig.Name, mig.Checksum, done, total, phase, start, now)
	b.Queue("select pg_notify($1, $2)", m.cfg.Channel,
		event{Lane: l.Name, Version: mig.Version, Progress: &progressHint{Done: done, Total: total, Phase: phase, Elapsed: elapsed}}.Payload())
	return sc.SendBatch(ctx, b).Close()
}
