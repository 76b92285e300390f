//! The session record as the scripts store it (a MessagePack array, see
//! `lua/prelude.lua`), decoded in-process, and the checks a verify applies
//! to it: verify reads the record with a plain `HGET` and judges it here,
//! against [`RedisClock`], instead of running a script in Redis.

use std::time::Instant;

/// A stored record, borrowed from the reply bytes. The seventh element is
/// the logout-all epoch (absent in a record from before epochs: 0);
/// elements after it (added by later versions of the schema) are tolerated
/// and ignored here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub created_ms: i64,
    pub last_seen_ms: i64,
    pub auth_time_ms: i64,
    pub expires_ms: i64,
    pub device_id: &'a [u8],
    pub metadata: &'a [u8],
    pub epoch: i64,
}

/// Redis's clock as this instance knows it: a `TIME` read inside the
/// global state refresher's script (every `state_refresh_interval`, and
/// never older than `state_max_staleness`, or verify fails closed anyway),
/// and the local monotonic instant the read was *sent*.
///
/// [`RedisClock::upper_ms`] is the latest Redis's clock can read now: the
/// read was executed after it was sent, so Redis's time now is at most the
/// time read plus the local time elapsed since sending (plus 1 ms for the
/// truncation to ms, plus 0.1 % of the elapsed time for the two clocks'
/// rates differing; NTP slews at most 0.05 %). Every liveness check uses
/// it, so a session is never accepted after its deadline by Redis's clock;
/// it may be refused up to the read's round trip (plus that margin) early.
/// A step of Redis's clock is followed within one refresh.
#[derive(Debug, Clone, Copy)]
pub struct RedisClock {
    pub redis_ms: i64,
    pub sent: Instant,
}

impl RedisClock {
    pub fn upper_ms(&self) -> i64 {
        let elapsed_us = self.sent.elapsed().as_micros() as i64;
        // elapsed + 0.1 %, rounded up, + 1 ms
        self.redis_ms + (elapsed_us + elapsed_us / 1000 + 999) / 1000 + 1
    }
}

/// What a verify checks a record against.
#[derive(Debug, Clone, Copy)]
pub struct Checks<'a> {
    /// [`RedisClock::upper_ms`], taken after the record was read.
    pub now_ms: i64,
    pub idle_ms: i64,
    /// Sessions created at or before this are revoked (`revoke-before`).
    pub cutoff_ms: i64,
    /// Sessions stamped with an older logout-all epoch are revoked.
    pub epoch: i64,
    pub device_id: &'a str,
    /// Largest password age allowed (< 0: not checked).
    pub max_auth_age_ms: i64,
    /// Slide the idle expiry when it was last slid this long ago (< 0: never).
    pub touch_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Expired, idle too long, or revoked by the cutoff: refused, and the
    /// record may be deleted (by a script that checks again in Redis).
    Dead,
    /// Alive, but not this device's: refused, left alone.
    OtherDevice,
    Alive {
        /// The password check is older than allowed: refused, not slid.
        reauth_needed: bool,
        /// The idle expiry is due to slide (a separate conditional write).
        touch_due: bool,
    },
}

/// Every check of a verify, in one place (the same rules as `alive()` in
/// `lua/prelude.lua`, which the writing scripts apply by Redis's own clock).
pub fn judge(rec: &Record<'_>, c: &Checks<'_>) -> Verdict {
    let now = c.now_ms;
    let alive = rec.expires_ms > now
        && rec.last_seen_ms.saturating_add(c.idle_ms) > now
        && rec.created_ms > c.cutoff_ms
        && rec.epoch >= c.epoch;
    if !alive {
        return Verdict::Dead;
    }
    if rec.device_id != c.device_id.as_bytes() {
        return Verdict::OtherDevice;
    }
    let reauth_needed = c.max_auth_age_ms >= 0 && now - rec.auth_time_ms > c.max_auth_age_ms;
    let touch_due = !reauth_needed && c.touch_ms >= 0 && now - rec.last_seen_ms >= c.touch_ms;
    Verdict::Alive {
        reauth_needed,
        touch_due,
    }
}

/// Decodes a record as Lua's `cmsgpack.pack` writes it.
pub fn decode(blob: &[u8]) -> Result<Record<'_>, String> {
    let mut r = Reader { buf: blob, at: 0 };
    let n = r.array_len()?;
    if n < 6 {
        return Err(format!("a session record of {n} elements"));
    }
    Ok(Record {
        created_ms: r.int()?,
        last_seen_ms: r.int()?,
        auth_time_ms: r.int()?,
        expires_ms: r.int()?,
        device_id: r.bytes()?,
        metadata: r.bytes()?,
        epoch: if n >= 7 { r.int()? } else { 0 },
    })
}

/// `(last_ip, last_user_agent)`, borrowed from the record.
pub type LastSeen<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// Elements 8 and 9 of a record (`last_ip`, `last_user_agent`), written by
/// the touch; `None` for a record that has not got them (or has "").
/// Kept apart from [`decode`] so the hot path never reads them.
pub fn whereabouts(blob: &[u8]) -> Result<LastSeen<'_>, String> {
    let mut r = Reader { buf: blob, at: 0 };
    let n = r.array_len()?;
    if n < 9 {
        return Ok((None, None));
    }
    for _ in 0..7 {
        r.skip()?;
    }
    fn some(b: &[u8]) -> Option<&[u8]> {
        (!b.is_empty()).then_some(b)
    }
    let ip = r.bytes()?;
    let ua = r.bytes()?;
    Ok((some(ip), some(ua)))
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or("a truncated session record")?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Result<u64, String> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn array_len(&mut self) -> Result<usize, String> {
        match self.byte()? {
            b @ 0x90..=0x9f => Ok(usize::from(b & 0x0f)),
            0xdc => Ok(self.be(2)? as usize),
            0xdd => Ok(self.be(4)? as usize),
            b => Err(format!("a session record is not an array (0x{b:02x})")),
        }
    }

    fn int(&mut self) -> Result<i64, String> {
        let b = self.byte()?;
        let v = match b {
            0x00..=0x7f => i64::from(b),
            0xe0..=0xff => i64::from(b as i8),
            0xcc => self.be(1)? as i64,
            0xcd => self.be(2)? as i64,
            0xce => self.be(4)? as i64,
            0xcf => i64::try_from(self.be(8)?).map_err(|_| "an integer out of range")?,
            0xd0 => i64::from(self.be(1)? as u8 as i8),
            0xd1 => i64::from(self.be(2)? as u16 as i16),
            0xd2 => i64::from(self.be(4)? as u32 as i32),
            0xd3 => self.be(8)? as i64,
            // Lua numbers are doubles; cmsgpack writes integral ones as
            // integers, but accept an integral float too.
            0xca => integral(f64::from(f32::from_bits(self.be(4)? as u32)))?,
            0xcb => integral(f64::from_bits(self.be(8)?))?,
            _ => return Err(format!("a record field is not an integer (0x{b:02x})")),
        };
        Ok(v)
    }

    /// Skips one scalar element (nil, boolean, number or string).
    fn skip(&mut self) -> Result<(), String> {
        match self.buf.get(self.at) {
            Some(0xc0 | 0xc2 | 0xc3) => self.take(1).map(|_| ()),
            Some(0xa0..=0xbf | 0xd9 | 0xda | 0xdb | 0xc4 | 0xc5 | 0xc6) => self.bytes().map(|_| ()),
            _ => self.int().map(|_| ()),
        }
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = match self.byte()? {
            b @ 0xa0..=0xbf => usize::from(b & 0x1f),
            0xd9 | 0xc4 => self.be(1)? as usize,
            0xda | 0xc5 => self.be(2)? as usize,
            0xdb | 0xc6 => self.be(4)? as usize,
            b => return Err(format!("a record field is not a string (0x{b:02x})")),
        };
        self.take(n)
    }
}

fn integral(f: f64) -> Result<i64, String> {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 {
        Ok(f as i64)
    } else {
        Err("a record field is not an integer".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `cmsgpack.pack({1700000000123, 1700000000456, 5, -3, "laptop", "{}"})` writes.
    fn sample() -> Vec<u8> {
        let mut v = vec![0x96, 0xcf];
        v.extend_from_slice(&1_700_000_000_123u64.to_be_bytes());
        v.push(0xcf);
        v.extend_from_slice(&1_700_000_000_456u64.to_be_bytes());
        v.push(0x05);
        v.push(0xfd);
        v.push(0xa6);
        v.extend_from_slice(b"laptop");
        v.push(0xa2);
        v.extend_from_slice(b"{}");
        v
    }

    #[test]
    fn decodes_what_cmsgpack_writes_and_tolerates_trailing_elements() {
        let blob = sample();
        let rec = decode(&blob).unwrap();
        assert_eq!(rec.created_ms, 1_700_000_000_123);
        assert_eq!(rec.last_seen_ms, 1_700_000_000_456);
        assert_eq!(rec.auth_time_ms, 5);
        assert_eq!(rec.expires_ms, -3);
        assert_eq!(rec.device_id, b"laptop");
        assert_eq!(rec.metadata, b"{}");
        assert_eq!(rec.epoch, 0, "a record from before epochs");
        // The seventh element is the epoch; an eighth (a later schema's)
        // is ignored.
        let mut seven = blob.clone();
        seven[0] = 0x97;
        seven.push(0x07);
        assert_eq!(decode(&seven).unwrap(), Record { epoch: 7, ..rec });
        let mut eight = seven.clone();
        eight[0] = 0x98;
        eight.push(0x09);
        assert_eq!(decode(&eight).unwrap(), Record { epoch: 7, ..rec });
        // Long strings and the other integer widths.
        let mut long = vec![0x96, 0xce, 0, 1, 0, 0, 0xcd, 1, 0, 0xd1, 0xff, 0xfe, 0xcb];
        long.extend_from_slice(&42.0f64.to_bits().to_be_bytes());
        long.extend_from_slice(&[0xd9, 40]);
        long.extend_from_slice(&[b'x'; 40]);
        long.extend_from_slice(&[0xda, 0, 3]);
        long.extend_from_slice(b"abc");
        let rec = decode(&long).unwrap();
        assert_eq!(
            (
                rec.created_ms,
                rec.last_seen_ms,
                rec.auth_time_ms,
                rec.expires_ms
            ),
            (65_536, 256, -2, 42)
        );
        assert_eq!(rec.device_id, &[b'x'; 40][..]);
        assert_eq!(rec.metadata, b"abc");
    }

    #[test]
    fn reads_the_touchs_elements_8_and_9_when_present() {
        let blob = sample();
        assert_eq!(whereabouts(&blob).unwrap(), (None, None));
        // + epoch (a big integer) + last_ip + last_user_agent
        let mut nine = blob.clone();
        nine[0] = 0x99;
        nine.push(0xcf);
        nine.extend_from_slice(&1_700_000_000_999u64.to_be_bytes());
        nine.push(0xa9);
        nine.extend_from_slice(b"192.0.2.7");
        nine.push(0xa4);
        nine.extend_from_slice(b"curl");
        let rec = decode(&nine).unwrap();
        assert_eq!(rec.epoch, 1_700_000_000_999);
        assert_eq!(Record { epoch: 0, ..rec }, decode(&blob).unwrap());
        assert_eq!(
            whereabouts(&nine).unwrap(),
            (Some(&b"192.0.2.7"[..]), Some(&b"curl"[..]))
        );
        // "" is "not recorded"; a nil 7th element is skipped too.
        let mut empty = blob.clone();
        empty[0] = 0x99;
        empty.extend_from_slice(&[0xc0, 0xa0, 0xa0]);
        assert_eq!(whereabouts(&empty).unwrap(), (None, None));
        assert!(whereabouts(&empty[..empty.len() - 1]).is_err());
    }

    #[test]
    fn refuses_what_is_not_a_whole_record() {
        let blob = sample();
        for cut in 0..blob.len() {
            assert!(decode(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut five = blob.clone();
        five[0] = 0x95;
        assert!(decode(&five).is_err());
        assert!(decode(b"\x81\xa1a\x01").is_err(), "a map");
        let mut float = vec![0x96, 0xcb];
        float.extend_from_slice(&1.5f64.to_bits().to_be_bytes());
        assert!(decode(&float).is_err());
        let mut big = vec![0x96, 0xcf];
        big.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(decode(&big).is_err());
    }

    fn rec() -> Record<'static> {
        Record {
            created_ms: 1_000,
            last_seen_ms: 5_000,
            auth_time_ms: 2_000,
            expires_ms: 100_000,
            device_id: b"laptop",
            metadata: b"",
            epoch: 3,
        }
    }

    fn checks(now_ms: i64) -> Checks<'static> {
        Checks {
            now_ms,
            idle_ms: 10_000,
            cutoff_ms: 999,
            epoch: 3,
            device_id: "laptop",
            max_auth_age_ms: -1,
            touch_ms: 1_000,
        }
    }

    const fn alive(reauth_needed: bool, touch_due: bool) -> Verdict {
        Verdict::Alive {
            reauth_needed,
            touch_due,
        }
    }

    #[test]
    fn judges_every_deadline_at_its_edge() {
        let r = rec();
        assert_eq!(judge(&r, &checks(5_999)), alive(false, false));
        assert_eq!(judge(&r, &checks(6_000)), alive(false, true));
        // idle: last seen 5 000 + 10 000
        assert_eq!(judge(&r, &checks(14_999)), alive(false, true));
        assert_eq!(judge(&r, &checks(15_000)), Verdict::Dead);
        // absolute lifetime
        let young = Record {
            last_seen_ms: 99_000,
            ..r
        };
        assert_eq!(judge(&young, &checks(99_999)), alive(false, false));
        assert_eq!(judge(&young, &checks(100_000)), Verdict::Dead);
        // cutoff: created at or before it is revoked
        let c = Checks {
            cutoff_ms: 1_000,
            ..checks(5_500)
        };
        assert_eq!(judge(&r, &c), Verdict::Dead);
        let c = Checks {
            cutoff_ms: 999,
            ..checks(5_500)
        };
        assert_eq!(judge(&r, &c), alive(false, false));
        // epoch: a record stamped before the current logout-all is revoked,
        // whatever the clocks say
        let c = Checks {
            epoch: 4,
            ..checks(5_500)
        };
        assert_eq!(judge(&r, &c), Verdict::Dead);
        let c = Checks {
            epoch: 2,
            ..checks(5_500)
        };
        assert_eq!(judge(&r, &c), alive(false, false));
    }

    #[test]
    fn judges_device_password_age_and_touch() {
        let r = rec();
        let c = Checks {
            device_id: "phone",
            ..checks(5_500)
        };
        assert_eq!(judge(&r, &c), Verdict::OtherDevice);
        // Dead wins over another device (a dead record may be reaped).
        let c = Checks {
            device_id: "phone",
            ..checks(20_000)
        };
        assert_eq!(judge(&r, &c), Verdict::Dead);
        // password checked at 2 000: age 4 000 at 6 000
        let c = Checks {
            max_auth_age_ms: 4_000,
            ..checks(6_000)
        };
        assert_eq!(judge(&r, &c), alive(false, true));
        let c = Checks {
            max_auth_age_ms: 3_999,
            ..checks(6_000)
        };
        assert_eq!(
            judge(&r, &c),
            alive(true, false),
            "a refused verify is not slid"
        );
        let c = Checks {
            touch_ms: -1,
            ..checks(9_000)
        };
        assert_eq!(judge(&r, &c), alive(false, false), "never touched");
    }

    #[test]
    fn the_clock_never_reads_early() {
        let clock = RedisClock {
            redis_ms: 1_000,
            sent: Instant::now(),
        };
        let before = clock.upper_ms();
        assert!(before >= 1_001);
        let old = RedisClock {
            redis_ms: 1_000,
            sent: Instant::now()
                .checked_sub(std::time::Duration::from_secs(10))
                .unwrap(),
        };
        // 10 s elapsed + 0.1 % + 1 ms
        assert!(old.upper_ms() > 1_000 + 10_000 + 10);
        assert!(old.upper_ms() < 1_000 + 10_000 + 10 + 1 + 1_000);
    }
}
