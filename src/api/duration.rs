//! A human duration such as `30s`, `5m`, `1h30m` or `30d`.
//!
//! Kubernetes' own `metav1.Duration` stops at hours, but error-budget windows and soak times
//! are naturally written in days, so Sluice accepts `d` as well. The schema carries a pattern
//! so the apiserver rejects a malformed duration at admission; the same grammar is parsed here.

use std::{borrow::Cow, fmt, str::FromStr, time};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// The schema pattern: one or more `<digits><unit>` groups, units `ms`, `s`, `m`, `h`, `d`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// A non-negative duration written as `<number><unit>` groups (`ms`, `s`, `m`, `h`, `d`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Duration {
    text: String,
    value: time::Duration,
}

/// Why a duration string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDurationError {
    #[error("empty duration: write it as e.g. 30s, 5m, 1h30m or 7d")]
    Empty,
    #[error("{0:?} is not a duration: write it as e.g. 30s, 5m, 1h30m or 7d")]
    Malformed(String),
    #[error("{0:?} is too long a duration")]
    Overflow(String),
}

impl Duration {
    /// The parsed value.
    pub fn as_std(&self) -> time::Duration {
        self.value
    }

    /// The text exactly as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A duration rendered in the largest unit that divides it (`ms` below whole seconds).
    pub fn from_std(value: time::Duration) -> Self {
        let millis = u64::try_from(value.as_millis()).unwrap_or(u64::MAX);
        if millis % 1_000 != 0 {
            return Self {
                text: format!("{millis}ms"),
                value: time::Duration::from_millis(millis),
            };
        }
        Self::from_secs(millis / 1_000)
    }

    /// A duration from whole seconds, rendered in the largest unit that divides it.
    pub fn from_secs(secs: u64) -> Self {
        let text = match secs {
            0 => "0s".to_string(),
            s if s % 86_400 == 0 => format!("{}d", s / 86_400),
            s if s % 3_600 == 0 => format!("{}h", s / 3_600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        };
        Self {
            text,
            value: time::Duration::from_secs(secs),
        }
    }
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(ParseDurationError::Empty);
        }
        let malformed = || ParseDurationError::Malformed(text.to_string());
        let overflow = || ParseDurationError::Overflow(text.to_string());
        let mut total_ms: u64 = 0;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(malformed)?;
            if digits == 0 {
                return Err(malformed());
            }
            let number: u64 = rest[..digits].parse().map_err(|_| overflow())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit_ms: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(malformed()),
            };
            rest = &rest[unit_len..];
            let part = number.checked_mul(unit_ms).ok_or_else(overflow)?;
            total_ms = total_ms.checked_add(part).ok_or_else(overflow)?;
        }
        Ok(Self {
            text: text.to_string(),
            value: time::Duration::from_millis(total_ms),
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Duration({})", self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

impl schemars::JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_unit_and_combinations() {
        let cases = [
            ("250ms", 250),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("30d", 2_592_000_000),
            ("0s", 0),
            ("1m30s500ms", 90_500),
        ];
        for (text, ms) in cases {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.as_std().as_millis(), ms, "{text}");
            assert_eq!(d.to_string(), text);
        }
    }

    #[test]
    fn rejects_what_the_schema_pattern_rejects() {
        for text in [
            "",
            "5",
            "m",
            "5x",
            "1.5h",
            "-5m",
            "5 m",
            "h5",
            "5mm",
            "99999999999999999999d",
        ] {
            assert!(
                text.parse::<Duration>().is_err(),
                "{text:?} should not parse"
            );
        }
    }

    #[test]
    fn from_secs_picks_the_largest_unit() {
        assert_eq!(Duration::from_secs(86_400).as_str(), "1d");
        assert_eq!(Duration::from_secs(7_200).as_str(), "2h");
        assert_eq!(Duration::from_secs(90).as_str(), "90s");
        assert_eq!(Duration::from_secs(0).as_str(), "0s");
    }

    #[test]
    fn serde_round_trip_keeps_the_text() {
        let d: Duration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1h30m\"");
        assert!(serde_json::from_str::<Duration>("\"soon\"").is_err());
    }

    proptest! {
        /// The Rust parser and the schema pattern agree on every string made of digits and unit letters.
        #[test]
        fn parser_agrees_with_schema_pattern(text in "[0-9msdh]{0,8}") {
            let pattern = regex_lite::Regex::new(DURATION_PATTERN).unwrap();
            let parses = text.parse::<Duration>().is_ok();
            // Overflow is the only way a pattern-valid string can fail to parse.
            let overflow = matches!(text.parse::<Duration>(), Err(ParseDurationError::Overflow(_)));
            prop_assert_eq!(parses || overflow, pattern.is_match(&text));
        }

        #[test]
        fn from_secs_round_trips(secs in 0u64..10_000_000) {
            let d = Duration::from_secs(secs);
            let parsed: Duration = d.as_str().parse().unwrap();
            prop_assert_eq!(parsed.as_std().as_secs(), secs);
        }
    }
}
