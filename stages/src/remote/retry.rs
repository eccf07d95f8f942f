//! Retry and timeout settings for `http(s)://` shards, from the environment:
//!
//! | variable | default | meaning |
//! | --- | --- | --- |
//! | `PIPELINE_HTTP_ATTEMPTS` | 8 | tries per request before giving up (1 = no retry); the count restarts once bytes flow again |
//! | `PIPELINE_HTTP_BACKOFF_MS` | 500 | wait before the first retry; doubles with each further one |
//! | `PIPELINE_HTTP_BACKOFF_MAX_MS` | 30000 | cap on that wait |
//! | `PIPELINE_HTTP_CONNECT_TIMEOUT_S` | 30 | connecting, TLS included |
//! | `PIPELINE_HTTP_READ_TIMEOUT_S` | 60 | one read with no byte arriving (headers or body) |
//!
//! With the defaults a server that stays down is given up on after about a minute of backoff.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySettings {
    pub attempts: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            attempts: 8,
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }
}

pub const ENV_ATTEMPTS: &str = "PIPELINE_HTTP_ATTEMPTS";
pub const ENV_BACKOFF_MS: &str = "PIPELINE_HTTP_BACKOFF_MS";
pub const ENV_BACKOFF_MAX_MS: &str = "PIPELINE_HTTP_BACKOFF_MAX_MS";
pub const ENV_CONNECT_TIMEOUT_S: &str = "PIPELINE_HTTP_CONNECT_TIMEOUT_S";
pub const ENV_READ_TIMEOUT_S: &str = "PIPELINE_HTTP_READ_TIMEOUT_S";

impl RetrySettings {
    /// The defaults, overridden by whichever `PIPELINE_HTTP_*` variables are set; a value that does
    /// not parse is an error naming the variable (a typo must not silently mean "default").
    pub fn from_env() -> Result<Self, String> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let d = Self::default();
        let attempts = parse(&lookup, ENV_ATTEMPTS, |v| v.parse::<u32>().ok())?;
        let millis = |v: &str| v.parse::<u64>().ok().map(Duration::from_millis);
        let seconds = |v: &str| {
            v.parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .filter(|d| !d.is_zero())
        };
        let settings = RetrySettings {
            attempts: attempts.unwrap_or(d.attempts),
            backoff: parse(&lookup, ENV_BACKOFF_MS, millis)?.unwrap_or(d.backoff),
            backoff_max: parse(&lookup, ENV_BACKOFF_MAX_MS, millis)?.unwrap_or(d.backoff_max),
            connect_timeout: parse(&lookup, ENV_CONNECT_TIMEOUT_S, seconds)?
                .unwrap_or(d.connect_timeout),
            read_timeout: parse(&lookup, ENV_READ_TIMEOUT_S, seconds)?.unwrap_or(d.read_timeout),
        };
        if settings.attempts == 0 {
            return Err(format!("{ENV_ATTEMPTS}=0: at least one attempt is needed"));
        }
        Ok(settings)
    }

    /// The wait before retry number `retry` (0-based): backoff·2^retry, capped, less up to a quarter
    /// at random so that many readers knocked out together do not come back in lockstep.
    pub fn delay(&self, retry: u32) -> Duration {
        let full = self
            .backoff
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
            .min(self.backoff_max);
        full.mul_f64(1.0 - 0.25 * random_unit())
    }
}

fn parse<T>(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
    convert: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, String> {
    match lookup(name) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => convert(v.trim()).map(Some).ok_or_else(|| {
            format!("{name}={v}: not a valid value (see docs/data.md, Remote shards)")
        }),
    }
}

/// A number in [0, 1) from std's per-process random hash keys; jitter needs no better.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<RetrySettings, String> {
        RetrySettings::from_lookup(|name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn environment_overrides_defaults_and_rejects_typos() {
        assert_eq!(from(&[]).unwrap(), RetrySettings::default());
        let s = from(&[
            (ENV_ATTEMPTS, "3"),
            (ENV_BACKOFF_MS, "2"),
            (ENV_BACKOFF_MAX_MS, "5"),
            (ENV_CONNECT_TIMEOUT_S, "0.5"),
            (ENV_READ_TIMEOUT_S, "2"),
        ])
        .unwrap();
        assert_eq!(s.attempts, 3);
        assert_eq!(s.backoff, Duration::from_millis(2));
        assert_eq!(s.connect_timeout, Duration::from_millis(500));
        assert_eq!(s.read_timeout, Duration::from_secs(2));
        for bad in [
            (ENV_ATTEMPTS, "three"),
            (ENV_ATTEMPTS, "0"),
            (ENV_READ_TIMEOUT_S, "-1"),
            (ENV_READ_TIMEOUT_S, "0"),
        ] {
            let e = from(&[bad]).unwrap_err();
            assert!(e.contains(bad.0), "{e}");
        }
    }

    #[test]
    fn delays_double_up_to_the_cap_with_bounded_jitter() {
        let s = RetrySettings {
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            ..Default::default()
        };
        for (retry, full) in [(0, 100), (1, 200), (3, 800), (4, 1000), (40, 1000)] {
            let d = s.delay(retry).as_secs_f64() * 1000.0;
            let full = full as f64;
            assert!(d <= full && d >= 0.75 * full - 1e-9, "retry {retry}: {d}");
        }
    }
}
