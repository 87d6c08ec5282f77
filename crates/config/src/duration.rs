//! Go-compatible durations (`1m30s`, `24h0m0s`, `300ms`, `0`).
//!
//! `KubeProxyConfiguration` stores durations the way Go's `time.Duration` prints them, and
//! operators write them the way Go's `time.ParseDuration` reads them. Neither `humantime` nor
//! `jiff` matches Go exactly (Go accepts a bare `0` and a sign, and prints `24h0m0s`), so this
//! is a small exact port of the two algorithms, with nanosecond precision in an `i64` as Go has.

use std::fmt;
use std::time::Duration;

/// A signed duration with nanosecond precision, printed and parsed like Go's `time.Duration`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(i64);

/// Why a duration string could not be parsed; the message mirrors Go's wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}")]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

const NANOSECOND: i64 = 1;
const MICROSECOND: i64 = 1_000 * NANOSECOND;
const MILLISECOND: i64 = 1_000 * MICROSECOND;
const SECOND: i64 = 1_000 * MILLISECOND;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;

impl GoDuration {
    pub const ZERO: GoDuration = GoDuration(0);

    pub const fn from_nanos(nanos: i64) -> Self {
        GoDuration(nanos)
    }
    pub const fn from_secs(secs: i64) -> Self {
        GoDuration(secs * SECOND)
    }
    pub const fn from_millis(ms: i64) -> Self {
        GoDuration(ms * MILLISECOND)
    }
    pub const fn from_mins(mins: i64) -> Self {
        GoDuration(mins * MINUTE)
    }
    pub const fn from_hours(hours: i64) -> Self {
        GoDuration(hours * HOUR)
    }
    pub const fn as_nanos(self) -> i64 {
        self.0
    }
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }
    /// The duration as a std `Duration`; negative values clamp to zero.
    pub fn to_std(self) -> Duration {
        Duration::from_nanos(self.0.max(0) as u64)
    }
    /// Whole seconds, truncated toward zero (for sysctls, which take seconds).
    pub const fn as_secs(self) -> i64 {
        self.0 / SECOND
    }

    /// Parses like Go's `time.ParseDuration`: an optional sign, then one or more
    /// `<decimal><unit>` pairs with units `ns us µs μs ms s m h`; a bare `0` is allowed.
    pub fn parse(input: &str) -> Result<Self, DurationError> {
        let err = |reason| DurationError {
            input: input.to_string(),
            reason,
        };
        let mut s = input;
        let mut negative = false;
        if let Some(rest) = s.strip_prefix('-') {
            negative = true;
            s = rest;
        } else if let Some(rest) = s.strip_prefix('+') {
            s = rest;
        }
        if s == "0" {
            return Ok(GoDuration(0));
        }
        if s.is_empty() {
            return Err(err("empty duration"));
        }
        // Accumulate in u128 so that overflow can be detected exactly as Go does (> 1<<63).
        let mut total: u128 = 0;
        while !s.is_empty() {
            // Integer part.
            let int_len = s.bytes().take_while(|b| b.is_ascii_digit()).count();
            let int_part = &s[..int_len];
            s = &s[int_len..];
            // Fraction part.
            let mut frac_part = "";
            if let Some(rest) = s.strip_prefix('.') {
                let frac_len = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
                frac_part = &rest[..frac_len];
                s = &rest[frac_len..];
                if int_part.is_empty() && frac_part.is_empty() {
                    return Err(err("missing number"));
                }
            } else if int_part.is_empty() {
                return Err(err("missing number"));
            }
            // Unit.
            let unit_len = s
                .char_indices()
                .find(|(_, c)| *c == '.' || c.is_ascii_digit())
                .map(|(i, _)| i)
                .unwrap_or(s.len());
            if unit_len == 0 {
                return Err(err("missing unit"));
            }
            let unit = match &s[..unit_len] {
                "ns" => NANOSECOND,
                "us" | "µs" | "μs" => MICROSECOND,
                "ms" => MILLISECOND,
                "s" => SECOND,
                "m" => MINUTE,
                "h" => HOUR,
                _ => return Err(err("unknown unit")),
            } as u128;
            s = &s[unit_len..];

            let int_value: u128 = if int_part.is_empty() {
                0
            } else {
                int_part.parse::<u128>().map_err(|_| err("overflow"))?
            };
            let mut value = int_value.checked_mul(unit).ok_or_else(|| err("overflow"))?;
            // Go scales the fraction in float64 (`leadingFraction` then `f * (unit / scale)`),
            // which rounds e.g. `0.3333333333333333333h` to exactly 20m; do the same.
            if !frac_part.is_empty() {
                let mut frac: u64 = 0;
                let mut scale: f64 = 1.0;
                for digit in frac_part.bytes() {
                    if frac > (i64::MAX as u64 - 9) / 10 {
                        break; // further digits cannot change the result
                    }
                    frac = frac * 10 + u64::from(digit - b'0');
                    scale *= 10.0;
                }
                value += (frac as f64 * (unit as f64 / scale)) as u128;
            }
            total = total.checked_add(value).ok_or_else(|| err("overflow"))?;
            if total > (1u128 << 63) {
                return Err(err("overflow"));
            }
        }
        if !negative && total > i64::MAX as u128 {
            return Err(err("overflow"));
        }
        let nanos = if negative {
            (total as i128).wrapping_neg() as i64
        } else {
            total as i64
        };
        Ok(GoDuration(nanos))
    }
}

impl fmt::Display for GoDuration {
    /// Formats like Go's `Duration.String()`: `0s`, `1.5s`, `300ms`, `1m30s`, `24h0m0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let negative = self.0 < 0;
        let mut u = self.0.unsigned_abs();
        if u == 0 {
            return f.write_str("0s");
        }
        let mut out = String::new();
        if u < SECOND as u64 {
            // Sub-second: a single unit with a fraction.
            let (unit, prec) = if u < MICROSECOND as u64 {
                ("ns", 0)
            } else if u < MILLISECOND as u64 {
                ("µs", 3)
            } else {
                ("ms", 6)
            };
            out.push_str(&fmt_frac(u, prec));
            out.push_str(unit);
        } else {
            let secs_and_frac = fmt_frac(u % (MINUTE as u64), 9);
            u /= MINUTE as u64;
            let mut s = secs_and_frac + "s";
            if u > 0 {
                let mins = u % 60;
                u /= 60;
                s = format!("{mins}m{s}");
                if u > 0 {
                    s = format!("{u}h{s}");
                }
            }
            out.push_str(&s);
        }
        if negative {
            f.write_str("-")?;
        }
        f.write_str(&out)
    }
}

/// `v / 10^prec` with the fraction printed without trailing zeros, as Go's `fmtFrac`+`fmtInt`.
fn fmt_frac(v: u64, prec: u32) -> String {
    let divisor = 10u64.pow(prec);
    let int = v / divisor;
    let frac = v % divisor;
    if frac == 0 {
        return int.to_string();
    }
    let digits = format!("{:0width$}", frac, width = prec as usize);
    format!("{int}.{}", digits.trim_end_matches('0'))
}

impl std::str::FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GoDuration::parse(s)
    }
}

impl serde::Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for GoDuration {
    /// Accepts a Go duration string, or (as `metav1.Duration` does not, but
    /// `TimeOrMetaDuration` for `logging.flushFrequency` does) an integer of nanoseconds.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"1m30s\" or \"24h0m0s\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<GoDuration, E> {
                GoDuration::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<GoDuration, E> {
                Ok(GoDuration(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<GoDuration, E> {
                i64::try_from(v)
                    .map(GoDuration)
                    .map_err(|_| E::custom("duration overflows"))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_parse(input: &str, nanos: i64) {
        assert_eq!(GoDuration::parse(input), Ok(GoDuration(nanos)), "{input}");
    }

    #[test]
    fn parses_like_go() {
        check_parse("0", 0);
        check_parse("-0", 0);
        check_parse("0s", 0);
        check_parse("5s", 5 * SECOND);
        check_parse("30s", 30 * SECOND);
        check_parse("1478s", 1478 * SECOND);
        check_parse("-5s", -5 * SECOND);
        check_parse("+5s", 5 * SECOND);
        check_parse("5.0s", 5 * SECOND);
        check_parse("5.6s", 5 * SECOND + 600 * MILLISECOND);
        check_parse("5.s", 5 * SECOND);
        check_parse(".5s", 500 * MILLISECOND);
        check_parse("1.004s", SECOND + 4 * MILLISECOND);
        check_parse("10ns", 10);
        check_parse("11us", 11 * MICROSECOND);
        check_parse("12µs", 12 * MICROSECOND);
        check_parse("12μs", 12 * MICROSECOND);
        check_parse("13ms", 13 * MILLISECOND);
        check_parse("14s", 14 * SECOND);
        check_parse("15m", 15 * MINUTE);
        check_parse("16h", 16 * HOUR);
        check_parse("3h30m", 3 * HOUR + 30 * MINUTE);
        check_parse("10.5s4m", 4 * MINUTE + 10 * SECOND + 500 * MILLISECOND);
        check_parse("-2m3.4s", -(2 * MINUTE + 3 * SECOND + 400 * MILLISECOND));
        check_parse(
            "1h2m3s4ms5us6ns",
            HOUR + 2 * MINUTE + 3 * SECOND + 4 * MILLISECOND + 5 * MICROSECOND + 6,
        );
        check_parse(
            "39h9m14.425s",
            39 * HOUR + 9 * MINUTE + 14 * SECOND + 425 * MILLISECOND,
        );
        check_parse("52763797000ns", 52763797000);
        check_parse("0.3333333333333333333h", 20 * MINUTE);
        check_parse("9007199254740993ns", (1 << 53) + 1);
        check_parse("9223372036854775807ns", i64::MAX);
        check_parse("-9223372036854775808ns", i64::MIN);
        check_parse("24h0m0s", 24 * HOUR);
        check_parse("1m30s", 90 * SECOND);
    }

    #[test]
    fn rejects_like_go() {
        for bad in [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "9223372036854775808ns",
            "1.2.3s",
            "5 s",
            "1 m",
        ] {
            assert!(GoDuration::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn formats_like_go() {
        let cases = [
            (0, "0s"),
            (1, "1ns"),
            (1100, "1.1µs"),
            (2200 * MICROSECOND, "2.2ms"),
            (3300 * MILLISECOND, "3.3s"),
            (4 * MINUTE + 5 * SECOND, "4m5s"),
            (4 * MINUTE + 5001 * MILLISECOND, "4m5.001s"),
            (5 * HOUR + 6 * MINUTE + 7001 * MILLISECOND, "5h6m7.001s"),
            (8 * MINUTE + 1, "8m0.000000001s"),
            (i64::MAX, "2562047h47m16.854775807s"),
            (i64::MIN, "-2562047h47m16.854775808s"),
            (24 * HOUR, "24h0m0s"),
            (HOUR, "1h0m0s"),
            (15 * MINUTE, "15m0s"),
            (30 * SECOND, "30s"),
            (SECOND, "1s"),
            (300 * MILLISECOND, "300ms"),
            (-5 * SECOND, "-5s"),
        ];
        for (nanos, text) in cases {
            assert_eq!(GoDuration(nanos).to_string(), text);
        }
    }

    #[test]
    fn round_trips() {
        for nanos in [
            0,
            1,
            999,
            1_000,
            1_234_567,
            59 * SECOND,
            61 * SECOND,
            3 * HOUR + 1,
            -7 * MINUTE,
        ] {
            let d = GoDuration(nanos);
            assert_eq!(GoDuration::parse(&d.to_string()), Ok(d));
        }
    }
}
