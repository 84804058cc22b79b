// Package pgconnect opens pgx connections to multi-host URLs the way a failover needs: pgx
// moves to the next host only on connection-level errors, so a host that answers with a FATAL
// such as 3D000 (a lagging standby that has not replayed CREATE DATABASE yet) ends pgx's attempt
// although a later host would serve. Connect then tries the hosts one by one.
package pgconnect

import (
	"context"
	"errors"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// nextHostCodes are the SQLSTATEs of a server's FATAL at connect time after which the next host
// of a multi-host URL is worth trying. Authentication failures (28P01, 28000) are not: libpq
// stops there too, and the same credentials go to every host.
var nextHostCodes = map[string]bool{
	"3D000": true, // invalid_catalog_name: the database does not exist (yet) on this host
	"57P03": true, // cannot_connect_now: starting up, shutting down, in recovery without hot standby
	"53300": true, // too_many_connections
}

// Connect is pgx.ConnectConfig, except that when the configuration has several hosts and pgx's
// attempt ended on a host's FATAL listed above, the hosts are tried again one by one (each with
// its own fallbacks, such as sslmode=prefer's plain-text retry), skipping those that answer so.
// The returned error is pgx's first one when no host serves.
func Connect(ctx context.Context, cfg *pgx.ConnConfig) (*pgx.Conn, error) {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err == nil || len(cfg.Fallbacks) == 0 || !nextHost(err) {
		return conn, err
	}
	first := err
	for _, one := range hosts(cfg) {
		if ctx.Err() != nil {
			break
		}
		conn, err := pgx.ConnectConfig(ctx, one)
		if err == nil {
			return conn, nil
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && !nextHostCodes[pgErr.Code] {
			return nil, err // a host answered with an error that every host would give
		}
	}
	return nil, first
}

// nextHost reports whether err is a server's FATAL after which another host may serve.
func nextHost(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && nextHostCodes[pgErr.Code]
}

// hosts splits cfg into one configuration per host:port, in order, each keeping the fallbacks
// of the same host (the TLS and plain-text attempts of sslmode=prefer).
func hosts(cfg *pgx.ConnConfig) []*pgx.ConnConfig {
	type hp struct {
		host string
		port uint16
	}
	all := append([]*pgconn.FallbackConfig{{Host: cfg.Host, Port: cfg.Port, TLSConfig: cfg.TLSConfig}}, cfg.Fallbacks...)
	var order []hp
	groups := map[hp][]*pgconn.FallbackConfig{}
	for _, f := range all {
		k := hp{f.Host, f.Port}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], f)
	}
	out := make([]*pgx.ConnConfig, 0, len(order))
	for _, k := range order {
		g := groups[k]
		c := cfg.Copy()
		c.Host, c.Port, c.TLSConfig = g[0].Host, g[0].Port, g[0].TLSConfig
		c.Fallbacks = g[1:]
		out = append(out, c)
	}
	return out
}
