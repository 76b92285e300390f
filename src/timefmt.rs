//! Human-readable UTC times, shared by the console's pages and
//! `sessiongate admin`. No time-zone database: operators read UTC.

/// `2026-12-02 07:03:12` from Unix seconds (UTC; negative = before 1970).
pub fn utc_seconds(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(utc_seconds(0), "1970-01-01 00:00:00");
        assert_eq!(utc_seconds(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_seconds(951_868_800), "2000-03-01 00:00:00");
        assert_eq!(utc_seconds(1_796_194_245), "2026-12-02 06:50:45");
        assert_eq!(utc_seconds(-1), "1969-12-31 23:59:59");
        assert_eq!(utc_seconds(4_102_444_800), "2100-01-01 00:00:00");
    }
}
