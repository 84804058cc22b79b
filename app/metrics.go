package app

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/multilanes/lanes/migrator"
	"github.com/multilanes/lanes/notifier"
)

// laneStates are the values of lanes_lane_state's state label, each exported for every lane
// (1 for the lane's current state, 0 for the others) so that a query never sees a series vanish.
var laneStates = []migrator.State{migrator.StatePending, migrator.StateRunning, migrator.StatePausing, migrator.StatePaused,
	migrator.StateFailed, migrator.StateDrift, migrator.StateDone, migrator.StateAhead}

// listenerModes are the values of lanes_listener_mode's mode label.
var listenerModes = []notifier.Delivery{notifier.DeliveryConnecting, notifier.DeliveryListening, notifier.DeliveryPolling, notifier.DeliveryStopped, DeliveryIdle}

// metrics is the Runtime's prometheus.Collector. The lane gauges are read from the replica's
// own view at scrape time (no query: they are what the replica learned through its listener);
// the counters and histograms count what this replica did.
type metrics struct {
	r *Runtime

	applied, failed    *prometheus.CounterVec
	duration           *prometheus.HistogramVec
	batchDuration      *prometheus.HistogramVec
	throttled          *prometheus.CounterVec
	takeovers          *prometheus.CounterVec
	lockWait           *prometheus.CounterVec
	version, latest    *prometheus.Desc
	done, locked       *prometheus.Desc
	state, ready, mode *prometheus.Desc
	notifications      *prometheus.Desc
	reconnects, polls  *prometheus.Desc
	rowsDone, rowsAll  *prometheus.Desc
	paused             *prometheus.Desc
}

func newMetrics(r *Runtime) *metrics {
	lane := []string{"lane"}
	m := &metrics{
		r: r,
		applied: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "lanes_migrations_applied_total",
			Help: "Migrations this replica applied and committed."}, lane),
		failed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "lanes_migrations_failed_total",
			Help: "Migration attempts by this replica that failed (rolled back; transient failures included)."}, lane),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "lanes_migration_duration_seconds",
			Help:    "How long each migration this replica ran took, applied or failed.",
			Buckets: []float64{0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120, 600, 1800, 3600, 4 * 3600}}, lane),
		batchDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "lanes_batch_duration_seconds",
			Help:    "How long each committed batch of a batched migration run by this replica took.",
			Buckets: []float64{0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}}, lane),
		throttled: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "lanes_batches_throttled_total",
			Help: "Times this replica held a batch back because the database's health asked for it."}, lane),
		takeovers: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "lanes_takeovers_total",
			Help: "Background lanes this replica took over after another session had held their lock."}, lane),
		lockWait: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "lanes_lock_wait_seconds_total",
			Help: "Time this replica spent waiting for a lane's lock held by another session."}, lane),
		version:       prometheus.NewDesc("lanes_lane_version", "The lane's applied version, as this replica last learned it.", lane, nil),
		latest:        prometheus.NewDesc("lanes_lane_latest_version", "The highest version of the lane known to this binary.", lane, nil),
		done:          prometheus.NewDesc("lanes_lane_done", "1 when every migration of the lane known to this binary is applied, else 0.", lane, nil),
		locked:        prometheus.NewDesc("lanes_lane_locked", "1 when a session was last seen holding the lane's lock, else 0.", lane, nil),
		state:         prometheus.NewDesc("lanes_lane_state", "1 for the lane's current state, 0 for the other states.", []string{"lane", "state"}, nil),
		ready:         prometheus.NewDesc("lanes_ready", "1 once the blocking lanes are applied and the replica is ready, else 0.", nil, nil),
		mode:          prometheus.NewDesc("lanes_listener_mode", "1 for the listener's current mode (connecting, listening, polling, stopped, idle: closed while every lane is done), 0 for the others.", []string{"mode"}, nil),
		notifications: prometheus.NewDesc("lanes_notifications_received_total", "Notifications the replica's listener received (its own probes excluded).", nil, nil),
		reconnects:    prometheus.NewDesc("lanes_listener_reconnects_total", "Times the listener connected again after its first connection.", nil, nil),
		rowsDone: prometheus.NewDesc("lanes_backfill_rows_done", "Keys walked so far by the lane's running batched migration (batches, for a cursor walk), as this replica last learned it; absent while none runs.",
			[]string{"lane", "version"}, nil),
		rowsAll: prometheus.NewDesc("lanes_backfill_rows_total", "Keys the lane's running batched migration walks, estimated when it started (0: unknown); absent while none runs.",
			[]string{"lane", "version"}, nil),
		paused: prometheus.NewDesc("lanes_lane_paused", "1 when an operator paused the lane, else 0.", lane, nil),
		polls:  prometheus.NewDesc("lanes_listener_polls_total", "State reads made because LISTEN was unavailable (hot standby, transaction pooler).", nil, nil),
	}
	for _, l := range r.lanes {
		// Every lane's series exist from the start, at 0.
		for _, v := range []*prometheus.CounterVec{m.applied, m.failed, m.throttled, m.takeovers, m.lockWait} {
			v.WithLabelValues(l.Name)
		}
		m.duration.WithLabelValues(l.Name)
		m.batchDuration.WithLabelValues(l.Name)
	}
	return m
}

func (m *metrics) vectors() []prometheus.Collector {
	return []prometheus.Collector{m.applied, m.failed, m.duration, m.batchDuration, m.throttled, m.takeovers, m.lockWait}
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.vectors() {
		c.Describe(ch)
	}
	for _, d := range []*prometheus.Desc{m.version, m.latest, m.done, m.locked, m.paused, m.state, m.ready, m.mode, m.notifications, m.reconnects, m.polls, m.rowsDone, m.rowsAll} {
		ch <- d
	}
}

// Collect implements prometheus.Collector. It runs no query.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.vectors() {
		c.Collect(ch)
	}
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	r := m.r
	r.mu.Lock()
	lanes := make([]migrator.LaneStatus, 0, len(r.lanes))
	for _, l := range r.lanes {
		s := r.state[l.Name]
		st := s.status
		if s.role == "applying" && !st.Done() && (st.State == migrator.StatePending || st.State == migrator.StateFailed) {
			// This replica holds the lane's lock: its view, read before it took it, is stale.
			st.State = migrator.StateRunning
		}
		if st.Progress != nil {
			p := *st.Progress
			st.Progress = &p
		}
		lanes = append(lanes, st)
	}
	ready := r.ready
	r.mu.Unlock()
	for _, st := range lanes {
		ch <- prometheus.MustNewConstMetric(m.version, prometheus.GaugeValue, float64(st.Version), st.Name)
		ch <- prometheus.MustNewConstMetric(m.latest, prometheus.GaugeValue, float64(st.Latest), st.Name)
		ch <- prometheus.MustNewConstMetric(m.done, prometheus.GaugeValue, b(st.Done()), st.Name)
		ch <- prometheus.MustNewConstMetric(m.locked, prometheus.GaugeValue, b(st.Locked), st.Name)
		ch <- prometheus.MustNewConstMetric(m.paused, prometheus.GaugeValue, b(st.Paused), st.Name)
		if p := st.Progress; p != nil {
			v := strconv.Itoa(int(p.Version))
			ch <- prometheus.MustNewConstMetric(m.rowsDone, prometheus.GaugeValue, float64(p.Done), st.Name, v)
			ch <- prometheus.MustNewConstMetric(m.rowsAll, prometheus.GaugeValue, float64(p.Total), st.Name, v)
		}
		known := false
		for _, s := range laneStates {
			known = known || s == st.State
			ch <- prometheus.MustNewConstMetric(m.state, prometheus.GaugeValue, b(s == st.State), st.Name, string(s))
		}
		if !known && st.State != "" {
			ch <- prometheus.MustNewConstMetric(m.state, prometheus.GaugeValue, 1, st.Name, string(st.State))
		}
	}
	ch <- prometheus.MustNewConstMetric(m.ready, prometheus.GaugeValue, b(ready))
	mode := r.delivery()
	for _, md := range listenerModes {
		ch <- prometheus.MustNewConstMetric(m.mode, prometheus.GaugeValue, b(md == mode), string(md))
	}
	stats := r.listenerStats()
	ch <- prometheus.MustNewConstMetric(m.notifications, prometheus.CounterValue, float64(stats.Notifications))
	ch <- prometheus.MustNewConstMetric(m.reconnects, prometheus.CounterValue, float64(max(0, stats.Connects-1)))
	ch <- prometheus.MustNewConstMetric(m.polls, prometheus.CounterValue, float64(stats.Polls))
}

// trace returns the migrator hooks that feed the counters and histograms.
func (m *metrics) trace() *migrator.Trace {
	return &migrator.Trace{
		LockWaited: func(lane string, waited time.Duration, _ bool) {
			m.lockWait.WithLabelValues(lane).Add(waited.Seconds())
		},
		MigrationDone: func(lane string, _ int32, _ string, took time.Duration, err error) {
			m.duration.WithLabelValues(lane).Observe(took.Seconds())
			if err != nil {
				m.failed.WithLabelValues(lane).Inc()
			} else {
				m.applied.WithLabelValues(lane).Inc()
			}
		},
		BatchDone: func(lane string, _ int32, _ int64, took time.Duration) {
			m.batchDuration.WithLabelValues(lane).Observe(took.Seconds())
		},
		BatchThrottled: func(lane string, _ int32, _ string) {
			m.throttled.WithLabelValues(lane).Inc()
		},
	}
}

// Collector returns the replica's metrics as a prometheus.Collector for a registry of the
// caller's (the Runtime registers nothing in the global registry):
//
//	reg := prometheus.NewRegistry()
//	reg.MustRegister(r.Collector())
//
// Lane gauges, read from this replica's view at scrape time without any query:
// lanes_lane_version{lane}, lanes_lane_latest_version{lane}, lanes_lane_done{lane} (0/1),
// lanes_lane_locked{lane} (0/1), lanes_lane_paused{lane} (0/1), lanes_lane_state{lane,state}
// (1 for the current state of pending, running, pausing, paused, failed, drift, done, ahead; 0 for the
// others), lanes_ready (0/1), lanes_listener_mode{mode}, and while a batched migration runs
// lanes_backfill_rows_done{lane,version} and lanes_backfill_rows_total{lane,version}. Counters: lanes_notifications_received_total,
// lanes_listener_reconnects_total, lanes_listener_polls_total, and per lane, for what this
// replica did: lanes_migrations_applied_total, lanes_migrations_failed_total,
// lanes_takeovers_total, lanes_lock_wait_seconds_total, lanes_batches_throttled_total.
// Histograms per lane: lanes_migration_duration_seconds, lanes_batch_duration_seconds.
//
// Every call returns the same collector. Handler serves it at /metrics.
func (r *Runtime) Collector() prometheus.Collector { return r.metrics }
