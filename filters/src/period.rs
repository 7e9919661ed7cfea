//! LiteLLM duration strings, as used by `budget_duration` and a key's `duration`: a positive whole
//! number followed by a unit, `30s`, `30m`, `30h`, `30d`, `1mo` (LiteLLM also accepts `w`, weeks,
//! so `2w` parses as `14d`). Months are calendar months, not 30 days: a monthly budget that starts
//! on Jan 31 resets on the last day of February.

use chrono::{DateTime, Months, TimeDelta, Utc};
use std::fmt;

/// A parsed duration. Second-based units (`s`, `m`, `h`, `d`, `w`) are all held as seconds;
/// months stay months because their length depends on the date they start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Seconds(u64),
    Months(u32),
}

const EXPECTED: &str =
    "expected a positive whole number followed by s, m, h, d, w or mo (e.g. 30s, 30m, 24h, 30d, 1mo)";

impl Period {
    /// Parses `"30d"`, `" 1mo "`, `"24h"`. Rejects empty strings, zero, signs, decimals, missing or
    /// unknown units, and values too large to represent.
    pub fn parse(s: &str) -> Result<Period, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err(format!("empty duration: {EXPECTED}"));
        }
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        if number.is_empty() {
            return Err(format!("invalid duration {s:?}: {EXPECTED}"));
        }
        if unit.is_empty() {
            return Err(format!("duration {s:?} has no unit: {EXPECTED}"));
        }
        let n: u64 = number
            .parse()
            .map_err(|_| format!("duration {s:?} is too large"))?;
        if n == 0 {
            return Err(format!("duration {s:?} is zero: {EXPECTED}"));
        }
        let seconds_per = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 604_800,
            "mo" => {
                return u32::try_from(n)
                    .map(Period::Months)
                    .map_err(|_| format!("duration {s:?} is too large"));
            }
            _ => {
                return Err(format!(
                    "duration {s:?} has unknown unit {unit:?}: {EXPECTED}"
                ))
            }
        };
        n.checked_mul(seconds_per)
            // Keep every period representable as a chrono TimeDelta (i64 milliseconds).
            .filter(|secs| *secs <= i64::MAX as u64 / 1_000)
            .map(Period::Seconds)
            .ok_or_else(|| format!("duration {s:?} is too large"))
    }

    /// The instant one period after `from`. Months are calendar months with the day clamped to the
    /// end of the target month (Jan 31 + 1mo = Feb 28, or Feb 29 in a leap year); the time of day
    /// is kept. Saturates at chrono's maximum date rather than overflowing.
    pub fn after(&self, from: DateTime<Utc>) -> DateTime<Utc> {
        let next = match *self {
            Period::Seconds(secs) => i64::try_from(secs)
                .ok()
                .and_then(TimeDelta::try_seconds)
                .and_then(|delta| from.checked_add_signed(delta)),
            Period::Months(months) => from.checked_add_months(Months::new(months)),
        };
        next.unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

impl fmt::Display for Period {
    /// The canonical string: months as `Nmo`, seconds in the largest of d, h, m, s that divides
    /// them exactly (`"24h"` displays as `"1d"`, `"90m"` as `"90m"`, `"2w"` as `"14d"`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Period::Months(n) => write!(f, "{n}mo"),
            Period::Seconds(secs) => {
                for (size, unit) in [(86_400, "d"), (3_600, "h"), (60, "m")] {
                    if secs % size == 0 {
                        return write!(f, "{}{unit}", secs / size);
                    }
                }
                write!(f, "{secs}s")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, mi, s).unwrap()
    }

    #[test]
    fn parses_litellm_units() {
        assert_eq!(Period::parse("30s"), Ok(Period::Seconds(30)));
        assert_eq!(Period::parse("30m"), Ok(Period::Seconds(1_800)));
        assert_eq!(Period::parse("30h"), Ok(Period::Seconds(108_000)));
        assert_eq!(Period::parse("30d"), Ok(Period::Seconds(2_592_000)));
        assert_eq!(Period::parse("7d"), Ok(Period::Seconds(604_800)));
        assert_eq!(Period::parse("24h"), Ok(Period::Seconds(86_400)));
        assert_eq!(Period::parse("2w"), Ok(Period::Seconds(1_209_600)));
        assert_eq!(Period::parse("1mo"), Ok(Period::Months(1)));
        assert_eq!(Period::parse("2mo"), Ok(Period::Months(2)));
        assert_eq!(Period::parse("  1mo\n"), Ok(Period::Months(1)));
        assert_eq!(Period::parse("\t30d "), Ok(Period::Seconds(2_592_000)));
    }

    #[test]
    fn rejects_bad_input_saying_what_was_expected() {
        for bad in [
            "", "   ", "0d", "0mo", "-1d", "+1d", "1.5h", "d", "mo", "30", "30x", "30 d", "30D",
            "1month", "30ms", "1y", "abc",
        ] {
            let err = Period::parse(bad).expect_err(bad);
            assert!(!err.is_empty(), "{bad:?}");
        }
        assert!(Period::parse("30x").unwrap_err().contains("expected"));
        assert!(Period::parse("").unwrap_err().contains("expected"));
        assert!(Period::parse("0d").unwrap_err().contains("zero"));
    }

    #[test]
    fn rejects_values_too_large() {
        assert!(Period::parse("99999999999999999999999s").is_err());
        assert!(Period::parse("18446744073709551615d").is_err());
        assert!(Period::parse("4294967296mo").is_err());
        assert_eq!(Period::parse("4294967295mo"), Ok(Period::Months(u32::MAX)));
    }

    #[test]
    fn displays_canonically_and_round_trips() {
        for s in [
            "30s", "30m", "30h", "30d", "1mo", "2mo", "7d", "90m", "25h", "61s",
        ] {
            let p = Period::parse(s).unwrap();
            assert_eq!(p.to_string(), s);
            assert_eq!(Period::parse(&p.to_string()), Ok(p));
        }
        assert_eq!(Period::parse("24h").unwrap().to_string(), "1d");
        assert_eq!(Period::parse("60m").unwrap().to_string(), "1h");
        assert_eq!(Period::parse("120s").unwrap().to_string(), "2m");
        assert_eq!(Period::parse("2w").unwrap().to_string(), "14d");
    }

    #[test]
    fn seconds_add_exactly() {
        let from = at(2025, 3, 1, 12, 0, 0);
        assert_eq!(
            Period::parse("30s").unwrap().after(from),
            at(2025, 3, 1, 12, 0, 30)
        );
        assert_eq!(
            Period::parse("30m").unwrap().after(from),
            at(2025, 3, 1, 12, 30, 0)
        );
        assert_eq!(
            Period::parse("30h").unwrap().after(from),
            at(2025, 3, 2, 18, 0, 0)
        );
        assert_eq!(
            Period::parse("30d").unwrap().after(from),
            at(2025, 3, 31, 12, 0, 0)
        );
    }

    #[test]
    fn months_are_calendar_months_with_the_day_clamped() {
        let month = Period::Months(1);
        assert_eq!(
            month.after(at(2025, 1, 15, 8, 0, 0)),
            at(2025, 2, 15, 8, 0, 0)
        );
        assert_eq!(
            month.after(at(2025, 1, 31, 8, 0, 0)),
            at(2025, 2, 28, 8, 0, 0)
        );
        assert_eq!(
            month.after(at(2024, 1, 31, 8, 0, 0)),
            at(2024, 2, 29, 8, 0, 0)
        );
        assert_eq!(
            month.after(at(2025, 3, 31, 0, 0, 0)),
            at(2025, 4, 30, 0, 0, 0)
        );
        assert_eq!(
            month.after(at(2025, 12, 31, 23, 59, 59)),
            at(2026, 1, 31, 23, 59, 59)
        );
        assert_eq!(
            Period::Months(2).after(at(2025, 12, 31, 0, 0, 0)),
            at(2026, 2, 28, 0, 0, 0)
        );
        assert_eq!(
            Period::Months(12).after(at(2024, 2, 29, 0, 0, 0)),
            at(2025, 2, 28, 0, 0, 0)
        );
    }

    #[test]
    fn after_saturates_instead_of_overflowing() {
        let from = at(2025, 1, 1, 0, 0, 0);
        assert_eq!(
            Period::Months(u32::MAX).after(from),
            DateTime::<Utc>::MAX_UTC
        );
        let huge = Period::parse("100000000000d").unwrap();
        assert_eq!(huge.after(from), DateTime::<Utc>::MAX_UTC);
    }
}
