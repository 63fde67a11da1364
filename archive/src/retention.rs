//! Retention policies with restic's semantics: which snapshots of one VM to keep.
//!
//! Snapshots are considered newest first. `last N` keeps the N newest. Each calendar rule
//! (`hourly`, `daily`, `weekly`, `monthly`, `yearly` N) keeps the newest snapshot of each
//! period, for the N newest periods that have a snapshot; periods are read in the given time
//! zone (so a snapshot at 23:30 UTC is in the next day in Berlin) and weeks are ISO weeks.
//! `within D` keeps everything newer than D (calendar units: `2d`, `1w`, `6m`, `1y`, `12h`) of
//! the newest snapshot — not of now, so a VM that stopped being backed up keeps its last
//! ones. `tags` keeps any snapshot carrying one of them. Rules combine by union: a snapshot
//! is kept when any rule keeps it, and every rule counts its periods independently of the
//! others. A policy with no rule keeps everything (callers refuse to run it, like restic).
//!
//! Pure: no I/O; the caller lists snapshots and deletes what is not kept.

use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, Zoned};

use crate::error::{Error, Result};
use crate::manifest::SnapshotEntry;

/// A count meaning "every period" (restic's `unlimited` / -1).
pub const UNLIMITED: u32 = u32::MAX;

/// How many to keep of each kind; 0 means the rule is not used, [`UNLIMITED`] every period.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
    /// Keep snapshots newer than the newest minus this calendar span.
    pub within: Option<Span>,
    /// Keep snapshots with any of these tags.
    pub tags: Vec<String>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.last == 0
            && self.hourly == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
            && self.yearly == 0
            && self.within.is_none()
            && self.tags.is_empty()
    }
}

/// Parse a `--keep-within` span: a number and a unit, several allowed (`1y6m`, `2d12h`):
/// `y` years, `m` months, `w` weeks, `d` days, `h` hours.
pub fn parse_within(s: &str) -> Result<Span> {
    let bad = || Error::Usage(format!("--keep-within {s:?}: expected e.g. 2d, 1w, 6m, 1y, 12h or 1y6m"));
    let mut span = Span::new();
    let mut digits = String::new();
    let mut any = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        span = match c {
            'y' => span.try_years(n),
            'm' => span.try_months(n),
            'w' => span.try_weeks(n),
            'd' => span.try_days(n),
            'h' => span.try_hours(n),
            _ => return Err(bad()),
        }
        .map_err(|_| bad())?;
        any = true;
    }
    if !digits.is_empty() || !any {
        return Err(bad());
    }
    Ok(span)
}

/// One snapshot as retention sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub time: Timestamp,
    pub tags: Vec<String>,
}

/// Whether a snapshot is kept, and by which rules ("last 1", "daily 3", "within 2d", ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub keep: bool,
    pub reasons: Vec<String>,
}

/// Decide for each of `snaps` (any order; one VM's snapshots), in `tz`. The result is in the
/// same order as `snaps`.
pub fn apply(policy: &Policy, snaps: &[Candidate], tz: &TimeZone) -> Result<Vec<Decision>> {
    let mut order: Vec<usize> = (0..snaps.len()).collect();
    // Newest first; equal times keep their given order.
    order.sort_by(|&a, &b| snaps[b].time.cmp(&snaps[a].time));
    let mut out = vec![Decision { keep: policy.is_empty(), reasons: Vec::new() }; snaps.len()];
    if policy.is_empty() {
        return Ok(out);
    }
    let oldest_kept_within = match (policy.within, order.first()) {
        (Some(span), Some(&newest)) => {
            let newest = snaps[newest].time.to_zoned(tz.clone());
            Some(newest.checked_sub(span).map_err(|e| Error::Usage(format!("--keep-within: {e}")))?.timestamp())
        }
        _ => None,
    };
    type Bucket = fn(&Zoned, usize) -> i64;
    let rules: [(&str, u32, Bucket); 6] = [
        ("last", policy.last, |_, i| i as i64),
        ("hourly", policy.hourly, |z, _| date_key(z) * 100 + i64::from(z.hour())),
        ("daily", policy.daily, |z, _| date_key(z)),
        ("weekly", policy.weekly, |z, _| {
            let w = z.date().iso_week_date();
            i64::from(w.year()) * 100 + i64::from(w.week())
        }),
        ("monthly", policy.monthly, |z, _| i64::from(z.year()) * 100 + i64::from(z.month())),
        ("yearly", policy.yearly, |z, _| i64::from(z.year())),
    ];
    let mut left: Vec<u32> = rules.iter().map(|r| r.1).collect();
    let mut last_key: Vec<Option<i64>> = vec![None; rules.len()];
    for (rank, &i) in order.iter().enumerate() {
        let s = &snaps[i];
        let zoned = s.time.to_zoned(tz.clone());
        let d = &mut out[i];
        if let Some(tag) = s.tags.iter().find(|t| policy.tags.contains(t)) {
            d.reasons.push(format!("tag {tag}"));
        }
        if let (Some(from), Some(span)) = (oldest_kept_within, policy.within) {
            if s.time > from {
                d.reasons.push(format!("within {span:#}"));
            }
        }
        for (r, (name, count, bucket)) in rules.iter().enumerate() {
            if left[r] == 0 {
                continue;
            }
            let key = bucket(&zoned, rank);
            if last_key[r] != Some(key) {
                last_key[r] = Some(key);
                left[r] -= 1;
                d.reasons.push(format!("{name} {}", count - left[r]));
            }
        }
        d.keep = !d.reasons.is_empty();
    }
    Ok(out)
}

/// The plan for a repository's snapshots: `policy` applied to each VM's snapshots on its own
/// (only VM `vm` when given); VMs by name, each VM's snapshots in the order given
/// (`Repository::list_snapshots`: oldest first). What `forget` and jobs
/// both run.
pub fn plan(
    snaps: Vec<SnapshotEntry>,
    vm: Option<&str>,
    policy: &Policy,
    tz: &TimeZone,
) -> Result<Vec<(SnapshotEntry, Decision)>> {
    let mut by_vm: std::collections::BTreeMap<String, Vec<SnapshotEntry>> = Default::default();
    for s in snaps.into_iter().filter(|s| vm.is_none_or(|v| s.snapshot.vm == v)) {
        by_vm.entry(s.snapshot.vm.clone()).or_default().push(s);
    }
    let mut out = Vec::new();
    for (_, group) in by_vm {
        let candidates = group
            .iter()
            .map(|s| {
                let time = s.snapshot.timestamp().ok_or_else(|| {
                    Error::corrupt(format!("snapshots/{}", s.id.to_hex()), format!("time {:?}", s.snapshot.time))
                })?;
                Ok(Candidate { time, tags: s.snapshot.tags.clone() })
            })
            .collect::<Result<Vec<_>>>()?;
        let decisions = apply(policy, &candidates, tz)?;
        out.extend(group.into_iter().zip(decisions));
    }
    Ok(out)
}

fn date_key(z: &Zoned) -> i64 {
    i64::from(z.year()) * 10_000 + i64::from(z.month()) * 100 + i64::from(z.day())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(times: &[&str]) -> Vec<Candidate> {
        times.iter().map(|t| Candidate { time: t.parse().expect("timestamp"), tags: Vec::new() }).collect()
    }

    fn kept(policy: &Policy, snaps: &[Candidate], tz: &TimeZone) -> Vec<usize> {
        let d = apply(policy, snaps, tz).expect("apply");
        (0..snaps.len()).filter(|&i| d[i].keep).collect()
    }

    #[test]
    fn last_and_daily_count_independently_and_combine_by_union() {
        // Two a day for four days (UTC).
        let s = at(&[
            "2026-01-01T01:00:00Z",
            "2026-01-01T13:00:00Z",
            "2026-01-02T01:00:00Z",
            "2026-01-02T13:00:00Z",
            "2026-01-03T01:00:00Z",
            "2026-01-03T13:00:00Z",
            "2026-01-04T01:00:00Z",
            "2026-01-04T13:00:00Z",
        ]);
        let utc = TimeZone::UTC;
        let p = Policy { last: 3, ..Policy::default() };
        assert_eq!(kept(&p, &s, &utc), [5, 6, 7]);
        // The newest of each of the 3 newest days: Jan 4 13:00, Jan 3 13:00, Jan 2 13:00.
        let p = Policy { daily: 3, ..Policy::default() };
        assert_eq!(kept(&p, &s, &utc), [3, 5, 7]);
        let p = Policy { last: 2, daily: 3, ..Policy::default() };
        assert_eq!(kept(&p, &s, &utc), [3, 5, 6, 7]);
        let d = apply(&p, &s, &utc).expect("apply");
        assert_eq!(d[7].reasons, ["last 1", "daily 1"]);
        assert_eq!(d[6].reasons, ["last 2"]);
        assert_eq!(d[3].reasons, ["daily 3"]);
        assert!(!d[0].keep && d[0].reasons.is_empty());
        // An empty policy keeps everything.
        assert_eq!(kept(&Policy::default(), &s, &utc).len(), 8);
        // Unlimited: the newest of every day there is.
        let p = Policy { daily: UNLIMITED, ..Policy::default() };
        assert_eq!(kept(&p, &s, &utc), [1, 3, 5, 7]);
        assert_eq!(apply(&p, &s, &utc).expect("apply")[1].reasons, ["daily 4"]);
    }

    #[test]
    fn month_ends_leap_days_and_weeks() {
        let s = at(&[
            "2024-01-31T12:00:00Z",
            "2024-02-28T12:00:00Z",
            "2024-02-29T12:00:00Z", // leap day: same month as the 28th
            "2024-03-01T00:30:00Z",
            "2024-12-30T12:00:00Z", // ISO week 1 of 2025
            "2025-01-05T12:00:00Z", // also ISO week 1 of 2025 (a Sunday)
            "2025-01-06T12:00:00Z", // ISO week 2
        ]);
        let utc = TimeZone::UTC;
        let p = Policy { monthly: 4, ..Policy::default() };
        // Jan 2025, Dec 2024, Mar 2024, Feb 2024 (the 29th, the newest of February).
        assert_eq!(kept(&p, &s, &utc), [2, 3, 4, 6]);
        let p = Policy { weekly: 2, ..Policy::default() };
        // Week 2 of 2025 (Jan 6) and week 1 of 2025 (Jan 5, newer than Dec 30).
        assert_eq!(kept(&p, &s, &utc), [5, 6]);
        let p = Policy { yearly: 5, ..Policy::default() };
        assert_eq!(kept(&p, &s, &utc), [4, 6]);
        let p = Policy { daily: 2, ..Policy::default() };
        assert_eq!(kept(&p, &s, &utc), [5, 6]);
    }

    #[test]
    fn periods_follow_the_time_zone_across_a_dst_change() {
        let berlin = TimeZone::get("Europe/Berlin").expect("tzdata");
        // 2026-03-29: clocks go from 02:00 to 03:00 in Berlin (CET → CEST).
        let s = at(&[
            "2026-03-28T22:30:00Z", // 23:30 CET on the 28th
            "2026-03-28T23:30:00Z", // 00:30 CET on the 29th
            "2026-03-29T21:30:00Z", // 23:30 CEST on the 29th
            "2026-03-29T22:30:00Z", // 00:30 CEST on the 30th
        ]);
        let p = Policy { daily: 3, ..Policy::default() };
        assert_eq!(kept(&p, &s, &berlin), [0, 2, 3]);
        // In UTC the same snapshots fall on the 28th (two) and the 29th (two).
        assert_eq!(kept(&Policy { daily: 3, ..Policy::default() }, &s, &TimeZone::UTC), [1, 3]);
        // Hourly: 02:00-03:00 does not exist on the 29th; four distinct local hours.
        assert_eq!(kept(&Policy { hourly: 10, ..Policy::default() }, &s, &berlin), [0, 1, 2, 3]);
    }

    #[test]
    fn within_counts_from_the_newest_snapshot_and_tags_keep() {
        let mut s =
            at(&["2026-01-01T00:00:00Z", "2026-01-09T00:00:00Z", "2026-01-10T00:00:00Z", "2026-01-12T00:00:00Z"]);
        s[0].tags = vec!["pinned".into()];
        let p = Policy {
            within: Some(parse_within("3d").expect("span")),
            tags: vec!["pinned".into()],
            ..Policy::default()
        };
        let d = apply(&p, &s, &TimeZone::UTC).expect("apply");
        assert_eq!(d.iter().map(|d| d.keep).collect::<Vec<_>>(), [true, false, true, true]);
        assert_eq!(d[0].reasons, ["tag pinned"]);
        assert_eq!(d[2].reasons, ["within 3d"]);
        // One month back from March 31 12:00 is February 28 12:00 (calendar arithmetic);
        // like restic, only snapshots strictly newer than that are kept.
        let s = at(&["2026-02-28T12:00:00Z", "2026-02-28T13:00:00Z", "2026-03-31T12:00:00Z"]);
        let p = Policy { within: Some(parse_within("1m").expect("span")), ..Policy::default() };
        assert_eq!(kept(&p, &s, &TimeZone::UTC), [1, 2]);
    }

    #[test]
    fn within_spans_parse() {
        assert!(parse_within("1y6m").is_ok() && parse_within("12h").is_ok() && parse_within("2w").is_ok());
        for bad in ["", "d", "3", "3x", "-1d", "1.5d"] {
            assert!(parse_within(bad).is_err(), "{bad:?}");
        }
    }
}
