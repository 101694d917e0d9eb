//! The ingest memory budget's estimates against what decoding really allocates, counted by
//! a global allocator: `memory::decoded_size` must not be less than the heap that decoded
//! readings hold, nor `memory::worst_case` less than what decoding a batch needs, for the
//! shapes that cost the most per byte on the wire.
#![allow(clippy::unwrap_used)]
// tests may panic
// A global allocator cannot be written without `unsafe`; this test binary counts what the
// (unsafe-free) library allocates. The library and program crates forbid `unsafe`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use cloud_ingest::memory::{decoded_size, worst_case};
use plantlink_model::{Reading, Timestamp};
use plantlink_wire::BatchEncoder;
use plantlink_wire::batch::{BatchDecoder, Limits};

/// Bytes live on the heap, with glibc's 16 bytes of chunk header per allocation.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged; it only counts. (An
// allocator cannot be written without `unsafe`; the library crates forbid it, this test
// binary needs it to measure them.)
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size() + 16, Ordering::Relaxed) + layout.size() + 16;
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() + 16, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One series of `n` points with `tags` tags of `len` bytes: the wire carries the tags once,
/// every decoded reading has its own copy.
fn series(n: usize, tags: usize, len: usize) -> Vec<Reading> {
    let mut r = Reading::new("acme", "press-01", "temperature", Timestamp(0), 1.5);
    for t in 0..tags {
        r.tags.insert(format!("k{t:02}"), "v".repeat(len));
    }
    (0..n)
        .map(|i| {
            let mut x = r.clone();
            x.ts = Timestamp(1_795_000_000_000_000 + i as i64);
            x
        })
        .collect()
}

#[test]
fn the_estimates_cover_what_decoding_allocates() {
    let limits = Limits::default();
    for (n, tags, len) in [
        (15_000, 32, 1),
        (15_000, 32, 100),
        (100_000, 0, 0),
        (2_000, 32, 1000),
    ] {
        let payload = BatchEncoder::default().encode(&series(n, tags, len));
        let mut decoder = BatchDecoder::new(limits);
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let readings = decoder.decode(&payload).unwrap();
        let held = LIVE.load(Ordering::Relaxed).saturating_sub(before);
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
        let estimate = decoded_size(&readings);
        let body = plantlink_wire::batch::declared_body_len(&payload).unwrap();
        let worst = worst_case(n, body, &limits);
        eprintln!(
            "{n} readings x {tags} tags of {len} B: {} B on the wire; decoded holds {held} B \
             (estimate {estimate}), peak while decoding {peak} B (worst case {worst})",
            payload.len()
        );
        assert!(
            estimate >= held,
            "{n} x {tags} x {len}: decoded readings hold {held} B, estimated {estimate}"
        );
        assert!(
            worst >= peak,
            "{n} x {tags} x {len}: decoding peaked at {peak} B, worst case {worst}"
        );
        drop(readings);
    }
    // More tags than the decoder allows (the worst case counts on it) are refused.
    let payload = BatchEncoder::default().encode(&series(20_000, 32, 1));
    let err = BatchDecoder::new(limits).decode(&payload).unwrap_err();
    assert!(err.to_string().contains("decoded tags"), "{err}");
}
