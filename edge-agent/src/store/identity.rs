//! The dedupe key: what makes a reading "the same one again".
//!
//! A reading's identity is (tenant, device, metric, ts); `seq` takes no part. The same
//! identity with the same value and the same tags is a *replay*, and dropping it is right. The same identity with another value or other tags is a *conflict*: it must
//! reach the cloud, which keeps the first value and reports the conflict. So the key the
//! queue remembers covers the identity *and* the content: a replay hashes alike and is
//! dropped, a conflict hashes differently and is stored.
//!
//! Values compare by [`plantlink_model::value_key`], exactly as the cloud compares them
//! (every NaN is one NaN, `-0.0` is `0.0`), so the agent and the cloud agree on what a
//! replay is: one written definition, in `plantlink_model::reading`.
//!
//! Agents before this definition hashed (device, metric, ts, seq). Their `seen` keys never
//! match these, so for up to two dedupe windows after an upgrade a replay of a reading stored
//! before it is stored again; the cloud drops it as the replay it is.

use plantlink_model::Reading;

/// Ends each text field. `0xff` never occurs in UTF-8, so no two different sequences of
/// fields feed the hasher the same bytes.
const END: [u8; 1] = [0xff];

/// The 64-bit dedupe hash of `r` as stored for `tenant`: tenant, device, metric, ts, the
/// value (as [`plantlink_model::value_key`] has it) and the tags in key order.
pub fn identity_hash(tenant: &str, r: &Reading) -> i64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for text in [tenant, r.device.as_str(), r.metric.as_str()] {
        h.update(text.as_bytes());
        h.update(&END);
    }
    h.update(&r.ts.0.to_le_bytes());
    h.update(&plantlink_model::value_key(r.value).to_le_bytes());
    // `Tags` is a BTreeMap: iteration is in key order, whatever order they arrived in.
    for (k, v) in &r.tags {
        h.update(k.as_bytes());
        h.update(&END);
        h.update(v.as_bytes());
        h.update(&END);
    }
    h.digest() as i64
}

#[cfg(test)]
mod tests {
    use plantlink_model::{Tags, Timestamp};

    use super::*;

    fn r() -> Reading {
        let mut r = Reading::new("acme", "l3-press01", "temperature", Timestamp(5), 21.5);
        r.tags.insert("line".into(), "l3".into());
        r
    }

    #[test]
    fn seq_takes_no_part() {
        let mut b = r();
        b.seq = Some(7);
        assert_eq!(identity_hash("acme", &r()), identity_hash("acme", &b));
    }

    #[test]
    fn each_part_of_identity_and_content_counts() {
        let base = identity_hash("acme", &r());
        assert_ne!(base, identity_hash("globex", &r()), "tenant");
        type Change = (&'static str, fn(&mut Reading));
        let changes: [Change; 7] = [
            ("device", |x| x.device = "l4-press01".into()),
            ("metric", |x| x.metric = "pressure".into()),
            ("ts", |x| x.ts = Timestamp(6)),
            ("value", |x| x.value = 21.25),
            ("value bits", |x| {
                x.value = f64::from_bits(21.5f64.to_bits() + 1)
            }),
            ("tag value", |x| {
                x.tags.insert("line".into(), "l4".into());
            }),
            ("tags", |x| x.tags = Tags::new()),
        ];
        for (what, change) in changes {
            let mut x = r();
            change(&mut x);
            assert_ne!(base, identity_hash("acme", &x), "{what}");
        }
    }

    #[test]
    fn values_compare_as_the_cloud_compares_them() {
        let mut nan = r();
        nan.value = f64::NAN;
        let mut other_nan = r();
        other_nan.value = f64::from_bits(f64::NAN.to_bits() | 1);
        assert_eq!(
            identity_hash("acme", &nan),
            identity_hash("acme", &other_nan)
        );
        let mut zero = r();
        zero.value = 0.0;
        let mut neg = r();
        neg.value = -0.0;
        assert_eq!(identity_hash("acme", &zero), identity_hash("acme", &neg));
    }

    #[test]
    fn fields_cannot_run_into_each_other() {
        let a = Reading::new("acme", "ab", "c", Timestamp(1), 1.0);
        let b = Reading::new("acme", "a", "bc", Timestamp(1), 1.0);
        assert_ne!(identity_hash("acme", &a), identity_hash("acme", &b));
        let mut a = r();
        a.tags = Tags::from([("a".into(), "bc".into())]);
        let mut b = r();
        b.tags = Tags::from([("ab".into(), "c".into())]);
        assert_ne!(identity_hash("acme", &a), identity_hash("acme", &b));
    }

    #[test]
    fn tag_order_does_not_matter() {
        let mut a = r();
        a.tags.insert("site".into(), "p1".into());
        let mut b = Reading::new("acme", "l3-press01", "temperature", Timestamp(5), 21.5);
        b.tags.insert("site".into(), "p1".into());
        b.tags.insert("line".into(), "l3".into());
        assert_eq!(identity_hash("acme", &a), identity_hash("acme", &b));
    }
}
