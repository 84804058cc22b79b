// Package faultproxy is a TCP proxy for tests that break the connection between a client and
// PostgreSQL on purpose: it can cut every connection, silently stop forwarding (a half-open
// connection, as after a network partition), or drop the NotificationResponse messages the
// server sends (a LISTEN that is accepted but never delivers, as behind a pooler in
// transaction mode). It can also silence some connections only: those whose client sent a
// marked text (a middlebox that lost one connection's state while the others flow). Clients
// must connect with sslmode=disable so the proxy can read the protocol.
package faultproxy

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Proxy forwards connections from a local port to a target address. Its methods are safe for
// concurrent use.
type Proxy struct {
	target string
	ln     net.Listener
	wg     sync.WaitGroup

	blackhole atomic.Bool
	deaf      atomic.Bool

	marker       atomic.Pointer[string]
	silentMarked atomic.Bool

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

// New listens on 127.0.0.1 on a free port and forwards to target: "host:port", or the path of
// a Unix socket (starting with "/", such as "/var/run/postgresql/.s.PGSQL.5432").
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{target: target, ln: ln, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr returns the proxy's listening address.
func (p *Proxy) Addr() *net.TCPAddr { return p.ln.Addr().(*net.TCPAddr) }

// SetBlackhole stops (true) or resumes (false) forwarding bytes in both directions without
// closing anything: connections become half-open. New connections are accepted but hang.
func (p *Proxy) SetBlackhole(on bool) { p.blackhole.Store(on) }

// SetMarker makes the proxy mark each connection whose client sends marker (from now on; an
// empty marker marks none): see SetSilenceMarked. Set it before the client sends the text.
func (p *Proxy) SetMarker(marker string) { p.marker.Store(&marker) }

// SetSilenceMarked stops (true) or resumes (false) forwarding bytes in both directions on the
// marked connections only (see SetMarker), without closing anything; the others go on.
func (p *Proxy) SetSilenceMarked(on bool) { p.silentMarked.Store(on) }

// SetDeaf drops (true) or forwards (false) the server's NotificationResponse messages.
func (p *Proxy) SetDeaf(on bool) { p.deaf.Store(on) }

// CutAll closes every open connection, as a server restart or a reset would.
func (p *Proxy) CutAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

// Close stops accepting, cuts every connection and waits for the proxy's goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	err := p.ln.Close()
	p.CutAll()
	p.wg.Wait()
	return err
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.conns, c)
	c.Close()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		network := "tcp"
		if strings.HasPrefix(p.target, "/") {
			network = "unix"
		}
		server, err := net.Dial(network, p.target)
		if err != nil {
			client.Close()
			continue
		}
		if !p.track(client) || !p.track(server) {
			client.Close()
			server.Close()
			return
		}
		l := &link{}
		p.wg.Add(2)
		go func() {
			defer p.wg.Done()
			p.pipe(l, server, client, false)
		}()
		go func() {
			defer p.wg.Done()
			p.pipe(l, client, server, true)
		}()
	}
}

// link is what the two pipes of one proxied connection share.
type link struct {
	marked atomic.Bool // the client sent the marker (see SetMarker)
}

// silenced reports whether bytes of l must be held now.
func (p *Proxy) silenced(l *link) bool {
	return p.blackhole.Load() || (l.marked.Load() && p.silentMarked.Load())
}

// pipe copies src to dst until either fails, then closes both. fromServer pipes parse the
// protocol's messages (type byte, int32 length) so that notifications can be dropped; the
// client's pipe looks for the marker, keeping the end of the previous read so that a marker
// split between two reads is found.
func (p *Proxy) pipe(l *link, dst, src net.Conn, fromServer bool) {
	defer p.untrack(dst)
	defer p.untrack(src)
	buf := make([]byte, 32*1024)
	var tail []byte
	for {
		var msg []byte
		if fromServer {
			var hdr [5]byte
			if _, err := io.ReadFull(src, hdr[:]); err != nil {
				return
			}
			n := int(binary.BigEndian.Uint32(hdr[1:]))
			if n < 4 || n > 1<<30 {
				return
			}
			msg = make([]byte, 5+n-4)
			copy(msg, hdr[:])
			if _, err := io.ReadFull(src, msg[5:]); err != nil {
				return
			}
			if msg[0] == 'A' && p.deaf.Load() {
				continue
			}
		} else {
			n, err := src.Read(buf)
			if err != nil {
				return
			}
			msg = buf[:n]
			if m := p.marker.Load(); m != nil && *m != "" && !l.marked.Load() {
				seen := append(tail, msg...)
				if strings.Contains(string(seen), *m) {
					l.marked.Store(true)
				}
				tail = append(tail[:0], seen[max(0, len(seen)-len(*m)+1):]...)
			}
		}
		for p.silenced(l) {
			// Hold the bytes: a partitioned network neither delivers nor resets.
			if err := waitUnblocked(p); err != nil {
				return
			}
		}
		if _, err := dst.Write(msg); err != nil {
			return
		}
	}
}

var errClosed = errors.New("proxy closed")

func waitUnblocked(p *Proxy) error {
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		return errClosed
	}
	sleepShort()
	return nil
}

func sleepShort() { time.Sleep(10 * time.Millisecond) }
