//! What the target agent counts and remembers, for `/metrics` and `/status` (see the `telemetry` crate).

use telemetry::{Counter, Histogram, Registry, Text};

/// Restore-time buckets, seconds.
const RESTORE_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The counters and the lists.
pub struct Stats {
    /// Migrations accepted (Prepare passed, not a dry run).
    pub started: Counter,
    /// Committed: the copy runs here.
    pub succeeded: Counter,
    pub failed: Counter,
    /// A restored copy that was killed because the source did not commit.
    pub rolled_back: Counter,
    pub bytes_received: Counter,
    pub pages_served_on_faults: Counter,
    pub restore: Histogram,
    pub migrations: Registry,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Counter::default(),
            succeeded: Counter::default(),
            failed: Counter::default(),
            rolled_back: Counter::default(),
            bytes_received: Counter::default(),
            pages_served_on_faults: Counter::default(),
            restore: Histogram::new(RESTORE_BUCKETS),
            migrations: Registry::default(),
        }
    }
}

impl telemetry::Source for Stats {
    fn metrics(&self) -> String {
        let mut t = Text::default();
        t.counter("migrate_target_migrations_started_total", "Migrations accepted by this target", &self.started)
            .counter(
                "migrate_target_migrations_succeeded_total",
                "Migrations committed: the copy runs here",
                &self.succeeded,
            )
            .counter("migrate_target_migrations_failed_total", "Accepted migrations that did not commit", &self.failed)
            .counter(
                "migrate_target_migrations_rolled_back_total",
                "Restored copies killed for want of a commit",
                &self.rolled_back,
            )
            .counter(
                "migrate_target_bytes_received_total",
                "Bytes of image data received on the wire",
                &self.bytes_received,
            )
            .counter(
                "migrate_target_pages_served_on_faults_total",
                "Page faults of restored tasks filled (post-copy)",
                &self.pages_served_on_faults,
            )
            .histogram("migrate_target_restore_seconds", "Time of criu restore", &self.restore)
            .gauge("migrate_target_migrations_running", "Migrations in progress", self.migrations.running_count());
        t.finish()
    }

    fn status(&self) -> serde_json::Value {
        self.migrations.status("target")
    }
}
