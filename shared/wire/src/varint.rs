//! LEB128 variable-length integers, zigzag for signed values, and a bounds-checked reader.

use crate::batch::DecodeError;

/// Appends `v` as an unsigned LEB128 varint (1 to 10 bytes).
pub(crate) fn put_u(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `v` zigzag-encoded, so that small magnitudes of either sign stay short.
pub(crate) fn put_i(out: &mut Vec<u8>, v: i64) {
    put_u(out, zigzag(v));
}

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

/// Reads values from one column, failing with [`DecodeError::Corrupt`] instead of
/// reading past its end.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Which column this is, for error messages.
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn short(&self) -> DecodeError {
        DecodeError::Corrupt(format!("{} ends early at byte {}", self.what, self.pos))
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or_else(|| self.short())?;
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(self.short());
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            if i == 9 && b > 1 {
                return Err(DecodeError::Corrupt(format!(
                    "{}: varint overflows 64 bits at byte {}",
                    self.what, self.pos
                )));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Corrupt(format!(
            "{}: varint longer than 10 bytes",
            self.what
        )))
    }

    pub(crate) fn i(&mut self) -> Result<i64, DecodeError> {
        self.u().map(unzigzag)
    }

    /// An unsigned varint that must fit `usize` and be at most `limit`.
    pub(crate) fn len(&mut self, what: &'static str, limit: usize) -> Result<usize, DecodeError> {
        let v = self.u()?;
        if v > limit as u64 {
            return Err(DecodeError::TooLarge {
                what,
                found: v,
                limit: limit as u64,
            });
        }
        Ok(v as usize)
    }

    /// Fails unless every byte of the column was consumed.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(DecodeError::Corrupt(format!(
                "{} has {} unread trailing bytes",
                self.what,
                self.remaining()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_the_edges() {
        for v in [0i64, 1, -1, 63, -64, 64, i64::MAX, i64::MIN, 1 << 40] {
            let mut out = Vec::new();
            put_i(&mut out, v);
            let mut r = Reader::new(&out, "test");
            assert_eq!(r.i().unwrap(), v);
            r.finish().unwrap();
        }
        let mut out = Vec::new();
        put_u(&mut out, u64::MAX);
        assert_eq!(out.len(), 10);
        assert_eq!(Reader::new(&out, "t").u().unwrap(), u64::MAX);
    }

    #[test]
    fn overlong_and_short_varints_are_errors() {
        assert!(Reader::new(&[0xff; 10], "t").u().is_err());
        assert!(Reader::new(&[0x80, 0x80], "t").u().is_err());
        assert!(Reader::new(&[], "t").u8().is_err());
    }
}
