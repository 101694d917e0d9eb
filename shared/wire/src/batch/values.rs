//! Lossless value coding: exact decimal scaling where possible, XOR otherwise.

use crate::batch::DecodeError;
use crate::varint::{Reader, put_i};

/// Largest decimal exponent tried; 10^15 and all below are exact in f64.
pub(crate) const MAX_EXP: u8 = 15;

/// Largest magnitude of a scaled integer, so that it converts to f64 exactly.
const MAX_SCALED: f64 = 9_007_199_254_740_992.0; // 2^53

pub(crate) const POW10: [f64; MAX_EXP as usize + 1] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

/// `v` scaled by `10^e` when that is exact and decodes to the same bits.
fn scaled(v: f64, e: u8) -> Option<i64> {
    let x = (v * POW10[e as usize]).round();
    // NaN and infinities fail `is_finite`.
    if !x.is_finite() || x.abs() > MAX_SCALED {
        return None;
    }
    let x = x as i64;
    ((x as f64 / POW10[e as usize]).to_bits() == v.to_bits()).then_some(x)
}

/// The smallest exponent at which `v` is an exact decimal, if any.
fn min_exponent(v: f64) -> Option<u8> {
    (0..=MAX_EXP).find(|&e| scaled(v, e).is_some())
}

/// The one exponent at which every value of the series is an exact decimal, if any.
///
/// An exact decimal with `e` digits is also exact with more (same rational, same
/// correctly rounded quotient) unless its scaled integer leaves the exact range, which
/// [`write_decimal`] re-checks, so the largest per-value minimum is the candidate.
pub(crate) fn decimal_exponent(values: impl Iterator<Item = f64>) -> Option<u8> {
    let mut best = 0u8;
    for v in values {
        best = best.max(min_exponent(v)?);
    }
    Some(best)
}

/// Writes decimal-scaled values; `None` (with `out` unchanged) if one is not exact.
pub(crate) fn write_decimal(
    out: &mut Vec<u8>,
    e: u8,
    values: impl Iterator<Item = f64>,
) -> Option<()> {
    let start = out.len();
    let mut prev = 0i64;
    for v in values {
        let Some(x) = scaled(v, e) else {
            out.truncate(start);
            return None;
        };
        put_i(out, x.wrapping_sub(prev));
        prev = x;
    }
    Some(())
}

pub(crate) fn read_decimal(
    r: &mut Reader<'_>,
    e: u8,
    n: usize,
    mut push: impl FnMut(f64),
) -> Result<(), DecodeError> {
    if e > MAX_EXP {
        return Err(DecodeError::Corrupt(format!(
            "decimal exponent {e} is over {MAX_EXP}"
        )));
    }
    let mut x = 0i64;
    for _ in 0..n {
        x = x.wrapping_add(r.i()?);
        push(x as f64 / POW10[e as usize]);
    }
    Ok(())
}

const XOR_EQUAL: u8 = 0xff;

pub(crate) fn write_xor(out: &mut Vec<u8>, values: impl Iterator<Item = f64>) {
    let mut prev: Option<u64> = None;
    for v in values {
        let bits = v.to_bits();
        match prev {
            None => out.extend_from_slice(&bits.to_le_bytes()),
            Some(p) => {
                let x = p ^ bits;
                if x == 0 {
                    out.push(XOR_EQUAL);
                } else {
                    let lead = x.leading_zeros() / 8;
                    let trail = x.trailing_zeros() / 8;
                    out.push(((lead as u8) << 4) | trail as u8);
                    let bytes = (x >> (trail * 8)).to_le_bytes();
                    out.extend_from_slice(&bytes[..(8 - lead - trail) as usize]);
                }
            }
        }
        prev = Some(bits);
    }
}

pub(crate) fn read_xor(
    r: &mut Reader<'_>,
    n: usize,
    mut push: impl FnMut(f64),
) -> Result<(), DecodeError> {
    let mut prev = 0u64;
    for i in 0..n {
        let bits = if i == 0 {
            let mut b = [0u8; 8];
            b.copy_from_slice(r.bytes(8)?);
            u64::from_le_bytes(b)
        } else {
            let control = r.u8()?;
            if control == XOR_EQUAL {
                prev
            } else {
                let (lead, trail) = (u32::from(control >> 4), u32::from(control & 0x0f));
                if lead + trail > 7 {
                    return Err(DecodeError::Corrupt(format!(
                        "XOR control byte {control:#04x} is invalid"
                    )));
                }
                let mut b = [0u8; 8];
                let len = (8 - lead - trail) as usize;
                b[..len].copy_from_slice(r.bytes(len)?);
                prev ^ (u64::from_le_bytes(b) << (trail * 8))
            }
        };
        push(f64::from_bits(bits));
        prev = bits;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plant_values_scale_exactly() {
        assert_eq!(decimal_exponent([21.53, 21.5, 20.0].into_iter()), Some(2));
        assert_eq!(decimal_exponent([1013.2].into_iter()), Some(1));
        assert_eq!(decimal_exponent([0.001, 1.234].into_iter()), Some(3));
        assert_eq!(decimal_exponent([3.0, -7.0].into_iter()), Some(0));
    }

    #[test]
    fn special_values_need_xor() {
        for v in [
            f64::NAN,
            f64::INFINITY,
            -0.0,
            1e300,
            f64::MIN_POSITIVE,
            0.1 + 0.2,
        ] {
            assert_eq!(decimal_exponent([v].into_iter()), None, "{v}");
        }
    }

    #[test]
    fn xor_round_trips_bits() {
        let vals = [1.5, 1.5, f64::NAN, -0.0, f64::INFINITY, 1e-310, 2.0];
        let mut out = Vec::new();
        write_xor(&mut out, vals.iter().copied());
        let mut got = Vec::new();
        let mut r = Reader::new(&out, "values");
        read_xor(&mut r, vals.len(), |v| got.push(v.to_bits())).unwrap();
        r.finish().unwrap();
        let want: Vec<u64> = vals.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want);
    }
}
