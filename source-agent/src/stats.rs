//! What the source agent counts and remembers, for `/metrics` and `/status` (see the `telemetry` crate)
//! and for `migrate status`.

use telemetry::{Counter, Histogram, Registry, Text};

/// The counters and the lists.
pub struct Stats {
    pub started: Counter,
    pub succeeded: Counter,
    pub failed: Counter,
    pub rolled_back: Counter,
    pub in_doubt: Counter,
    pub bytes_sent: Counter,
    pub image_bytes: Counter,
    pub pages_served_on_faults: Counter,
    pub downtime: Histogram,
    pub migrations: Registry,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Counter::default(),
            succeeded: Counter::default(),
            failed: Counter::default(),
            rolled_back: Counter::default(),
            in_doubt: Counter::default(),
            bytes_sent: Counter::default(),
            image_bytes: Counter::default(),
            pages_served_on_faults: Counter::default(),
            downtime: Histogram::new(telemetry::DOWNTIME_BUCKETS),
            migrations: Registry::default(),
        }
    }
}

impl telemetry::Source for Stats {
    fn metrics(&self) -> String {
        let mut t = Text::default();
        t.counter(
            "migrate_source_migrations_started_total",
            "Migrations started (after the pre-flight passed)",
            &self.started,
        )
        .counter(
            "migrate_source_migrations_succeeded_total",
            "Migrations whose copy runs on the target",
            &self.succeeded,
        )
        .counter("migrate_source_migrations_failed_total", "Migrations that failed, whatever the stage", &self.failed)
        .counter(
            "migrate_source_migrations_rolled_back_total",
            "Failed after the freeze: the original was resumed",
            &self.rolled_back,
        )
        .counter(
            "migrate_source_migrations_in_doubt_total",
            "Commit sent but not confirmed: original kept stopped",
            &self.in_doubt,
        )
        .counter("migrate_source_bytes_sent_total", "Bytes of image data on the wire", &self.bytes_sent)
        .counter(
            "migrate_source_image_bytes_total",
            "Bytes of CRIU images sent (before compression)",
            &self.image_bytes,
        )
        .counter(
            "migrate_source_pages_served_on_faults_total",
            "Pages sent to answer the target's page faults (post-copy)",
            &self.pages_served_on_faults,
        )
        .histogram(
            "migrate_source_downtime_seconds",
            "From the freeze to the copy running on the target",
            &self.downtime,
        )
        .gauge("migrate_source_migrations_running", "Migrations in progress", self.migrations.running_count());
        t.finish()
    }

    fn status(&self) -> serde_json::Value {
        self.migrations.status("source")
    }
}
