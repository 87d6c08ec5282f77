//! klog-style logs, as upstream kube-proxy writes them, on `tracing`.
//!
//! Line format: `I1122 10:00:00.123456    4242 sync.rs:81] "Synced rules" family="IPv4"`,
//! the first letter being I, W or E. Verbosity follows klog's `-v`: level 0-1 shows
//! lifecycle, warnings and errors (`info!`); 2-4 adds per-sync lines (`debug!`); 5 and more
//! adds per-object detail (`trace!`). Every level prints as an `I` line, as klog does.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The most verbose `tracing` level shown at klog verbosity `v`.
pub fn level_for_verbosity(v: u32) -> Level {
    match v {
        0 | 1 => Level::INFO,
        2..=4 => Level::DEBUG,
        _ => Level::TRACE,
    }
}

/// The `-v` in effect (changed at run time through `/debug/flags/v`).
static VERBOSITY: AtomicU32 = AtomicU32::new(0);
type FilterHandle = tracing_subscriber::reload::Handle<Targets, tracing_subscriber::Registry>;
static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Which targets log at which level for klog verbosity `v`: kube-proxy's own code by `-v`;
/// libraries (HTTP client, watcher) warnings and errors only, their debug output from
/// `-v=8` on, like client-go's request logging.
fn filter_for(verbosity: u32) -> Targets {
    let libraries = match verbosity {
        0..=7 => Level::WARN,
        8..=9 => Level::DEBUG,
        _ => Level::TRACE,
    };
    // kube's client logs every failed request as an error; our own warning says the same
    // with context (which kind, the backoff), so during an API outage it would only double
    // the log lines. Shown with the client's debug output.
    let client_errors = match verbosity {
        0..=7 => tracing_subscriber::filter::LevelFilter::OFF,
        _ => tracing_subscriber::filter::LevelFilter::from_level(libraries),
    };
    Targets::new()
        .with_default(libraries)
        .with_target("kube_client::client::builder", client_errors)
        .with_target("kube_proxy", level_for_verbosity(verbosity))
}

/// Installs the global subscriber; logs go to stderr like klog's.
pub fn init(verbosity: u32) {
    use tracing_subscriber::prelude::*;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter_for(verbosity));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .event_format(KlogFormat);
    // A second init (tests) keeps the first subscriber.
    if tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(filter).with(layer),
    )
    .is_ok()
    {
        VERBOSITY.store(verbosity, Ordering::Relaxed);
        let _ = FILTER.set(handle);
    }
}

/// The klog verbosity in effect.
pub fn verbosity() -> u32 {
    VERBOSITY.load(Ordering::Relaxed)
}

/// Changes the verbosity of the running process.
pub fn set_verbosity(verbosity: u32) {
    VERBOSITY.store(verbosity, Ordering::Relaxed);
    if let Some(handle) = FILTER.get() {
        let _ = handle.reload(filter_for(verbosity));
    }
}

pub struct KlogFormat;

impl<S, N> FormatEvent<S, N> for KlogFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let severity = match *meta.level() {
            Level::ERROR => 'E',
            Level::WARN => 'W',
            _ => 'I',
        };
        let file = meta
            .file()
            .map(|f| f.rsplit('/').next().unwrap_or(f))
            .unwrap_or("?");
        let line = meta.line().unwrap_or(0);
        let mut fields = KlogFields::default();
        event.record(&mut fields);
        writeln!(
            writer,
            "{severity}{} {:>7} {file}:{line}] {:?}{}",
            klog_timestamp(SystemTime::now()),
            std::process::id(),
            fields.message,
            fields.rest
        )
    }
}

#[derive(Default)]
struct KlogFields {
    message: String,
    rest: String,
}

impl Visit for KlogFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            let _ = write!(self.rest, " {}={:?}", field.name(), value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            // Display-like values (`%x`) arrive here already formatted; quote them as klog does.
            let _ = write!(
                self.rest,
                " {}=\"{}\"",
                field.name(),
                format!("{value:?}").replace('"', "\\\"")
            );
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        let _ = write!(self.rest, " {}={value}", field.name());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        let _ = write!(self.rest, " {}={value}", field.name());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        let _ = write!(self.rest, " {}={value}", field.name());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        let _ = write!(self.rest, " {}={value}", field.name());
    }
}

/// `MMDD hh:mm:ss.uuuuuu` in UTC, klog's header timestamp.
pub fn klog_timestamp(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (_, month, day) = civil_from_days((secs / 86400) as i64);
    let rem = secs % 86400;
    format!(
        "{month:02}{day:02} {:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// RFC 3339 with nanoseconds in UTC, as Go's `time.RFC3339Nano` (for JSON bodies).
pub fn rfc3339_nanos(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86400) as i64);
    let rem = secs % 86400;
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
    let nanos = since.subsec_nanos();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_348_800) + Duration::from_micros(123_456);
        assert_eq!(klog_timestamp(t), "1122 12:00:00.123456");
        assert_eq!(rfc3339_nanos(t), "2026-11-22T12:00:00.123456Z");
        assert_eq!(rfc3339_nanos(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn verbosity_levels() {
        assert_eq!(level_for_verbosity(0), Level::INFO);
        assert_eq!(level_for_verbosity(2), Level::DEBUG);
        assert_eq!(level_for_verbosity(9), Level::TRACE);
    }
}
