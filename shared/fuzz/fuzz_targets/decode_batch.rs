//! Fuzz the batch payload decoder: arbitrary bytes, and bytes behind a valid version byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plantlink_wire::BatchDecoder;

fuzz_target!(|data: &[u8]| {
    let mut dec = BatchDecoder::default();
    let _ = dec.decode(data);
    // Also reach the body parser directly, past zstd, by compressing the input.
    if let Ok(compressed) = zstd_compress(data) {
        let _ = dec.decode(&compressed);
    }
});

fn zstd_compress(body: &[u8]) -> Result<Vec<u8>, ()> {
    let mut out = vec![plantlink_wire::batch::CODEC_VERSION];
    out.extend(zstd::bulk::compress(body, 1).map_err(|_| ())?);
    Ok(out)
}
