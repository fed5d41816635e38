//! Deployment windows: whether now is inside an allow window and outside every deny window,
//! and when that changes. Pure (the time is given).

use croner::Cron;
use croner::parser::CronParser;
use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::api::pipeline::{DeployWindow, WindowKind};

/// A window's schedule, parsed.
struct Parsed {
    cron: Cron,
    zone: TimeZone,
    zone_name: String,
    length: std::time::Duration,
    kind: WindowKind,
}

fn parse(window: &DeployWindow) -> Result<Parsed, String> {
    let cron = CronParser::builder()
        .build()
        .parse(&window.schedule)
        .map_err(|e| {
            format!(
                "schedule {:?} is not a cron expression: {e}",
                window.schedule
            )
        })?;
    let zone_name = window.time_zone.clone().unwrap_or_else(|| "UTC".into());
    let zone = TimeZone::get(&zone_name)
        .map_err(|_| format!("time zone {zone_name:?} is not an IANA time zone"))?;
    Ok(Parsed {
        cron,
        zone,
        zone_name,
        length: window.duration.as_std(),
        kind: window.kind,
    })
}

/// Checks every window; the first problem, said plainly.
pub fn validate(windows: &[DeployWindow]) -> Result<(), String> {
    for (i, w) in windows.iter().enumerate() {
        parse(w).map_err(|e| format!("window {}: {e}", i + 1))?;
    }
    Ok(())
}

/// The verdict at `now`: whether a release may enter, why, and when that may change.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub open: bool,
    pub message: String,
    pub changes_at: Option<Timestamp>,
}

fn add(t: Timestamp, d: std::time::Duration) -> Timestamp {
    t.checked_add(jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// "09:00 Europe/Berlin" (with the date when it is not today there).
fn local(at: Timestamp, now: Timestamp, w: &Parsed) -> String {
    let at = at.to_zoned(w.zone.clone());
    let today = now.to_zoned(w.zone.clone()).date();
    if at.date() == today {
        format!("{} {}", at.strftime("%H:%M"), w.zone_name)
    } else {
        format!("{} {}", at.strftime("%Y-%m-%d %H:%M"), w.zone_name)
    }
}

/// When the window that covers `now` opened, if one does.
fn open_since(w: &Parsed, now: Timestamp) -> Option<Timestamp> {
    let zoned = now.to_zoned(w.zone.clone());
    let start = w
        .cron
        .find_previous_occurrence(&zoned, true)
        .ok()?
        .timestamp();
    (add(start, w.length) > now).then_some(start)
}

/// The next time the window opens after `now`.
fn next_open(w: &Parsed, now: Timestamp) -> Option<Timestamp> {
    let zoned = now.to_zoned(w.zone.clone());
    Some(w.cron.find_next_occurrence(&zoned, false).ok()?.timestamp())
}

/// Whether `windows` let a release in at `now`.
pub fn judge(windows: &[DeployWindow], now: Timestamp) -> Result<Verdict, String> {
    let parsed: Vec<Parsed> = windows.iter().map(parse).collect::<Result<_, _>>()?;
    let (allows, denies): (Vec<&Parsed>, Vec<&Parsed>) =
        parsed.iter().partition(|w| w.kind == WindowKind::Allow);
    // Inside a deny window: closed until the last covering one ends.
    let denying: Vec<(Timestamp, &Parsed)> = denies
        .iter()
        .filter_map(|w| open_since(w, now).map(|start| (add(start, w.length), *w)))
        .collect();
    if let Some((until, w)) = denying.iter().max_by_key(|(until, _)| *until) {
        return Ok(Verdict {
            open: false,
            message: format!("inside a deny window until {}", local(*until, now, w)),
            changes_at: Some(*until),
        });
    }
    if allows.is_empty() {
        let next_deny = denies.iter().filter_map(|w| next_open(w, now)).min();
        return Ok(Verdict {
            open: true,
            message: "outside every deny window".into(),
            changes_at: next_deny,
        });
    }
    let allowing = allows
        .iter()
        .filter_map(|w| open_since(w, now).map(|start| (add(start, w.length), *w)))
        .max_by_key(|(until, _)| *until);
    match allowing {
        Some((until, w)) => Ok(Verdict {
            open: true,
            message: format!("inside an allow window until {}", local(until, now, w)),
            changes_at: Some(until),
        }),
        None => {
            let next = allows
                .iter()
                .filter_map(|w| next_open(w, now).map(|at| (at, *w)))
                .min_by_key(|(at, _)| *at);
            Ok(Verdict {
                open: false,
                message: match next {
                    Some((at, w)) => {
                        format!("outside the allowed windows until {}", local(at, now, w))
                    }
                    None => "outside the allowed windows, and none opens again".into(),
                },
                changes_at: next.map(|(at, _)| at),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(kind: WindowKind, schedule: &str, hours: u64, zone: Option<&str>) -> DeployWindow {
        DeployWindow {
            kind,
            schedule: schedule.into(),
            duration: crate::api::Duration::from_secs(hours * 3600),
            time_zone: zone.map(String::from),
        }
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn allow_and_deny_windows_in_their_time_zones() {
        // Weekdays 09:00-17:00 in Berlin (UTC+1 in December).
        let office = window(WindowKind::Allow, "0 9 * * 1-5", 8, Some("Europe/Berlin"));
        // Wednesday 2026-12-02.
        let early = judge(std::slice::from_ref(&office), at("2026-12-02T07:30:00Z")).unwrap();
        assert!(!early.open);
        assert_eq!(
            early.message,
            "outside the allowed windows until 09:00 Europe/Berlin"
        );
        assert_eq!(early.changes_at, Some(at("2026-12-02T08:00:00Z")));
        let inside = judge(std::slice::from_ref(&office), at("2026-12-02T10:00:00Z")).unwrap();
        assert!(inside.open, "{}", inside.message);
        assert_eq!(inside.changes_at, Some(at("2026-12-02T16:00:00Z")));
        // Saturday: the next window is Monday.
        let weekend = judge(std::slice::from_ref(&office), at("2026-12-05T10:00:00Z")).unwrap();
        assert!(!weekend.open);
        assert!(
            weekend.message.contains("2026-12-07 09:00"),
            "{}",
            weekend.message
        );
        // A freeze over the holidays wins over the allow window.
        let freeze = window(WindowKind::Deny, "0 0 24 12 *", 72, Some("Europe/Berlin"));
        let held = judge(&[office, freeze.clone()], at("2026-12-24T10:00:00Z")).unwrap();
        assert!(!held.open);
        assert!(
            held.message.contains("deny window until 2026-12-27 00:00"),
            "{}",
            held.message
        );
        // Deny windows alone: open outside them.
        assert!(judge(&[freeze], at("2026-12-02T10:00:00Z")).unwrap().open);
        assert!(judge(&[], at("2026-12-02T10:00:00Z")).unwrap().open);
    }

    #[test]
    fn bad_schedules_and_zones_are_named() {
        let bad = window(WindowKind::Allow, "0 25 * * *", 1, None);
        assert!(validate(&[bad]).unwrap_err().contains("window 1: schedule"));
        let zone = window(WindowKind::Allow, "0 9 * * *", 1, Some("Mars/Olympus"));
        assert!(
            validate(&[zone])
                .unwrap_err()
                .contains("\"Mars/Olympus\" is not an IANA time zone")
        );
    }
}
