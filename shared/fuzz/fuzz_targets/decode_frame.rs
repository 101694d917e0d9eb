//! Fuzz the frame decoder: it must return a frame, Incomplete, or an error, never panic,
//! and whatever it decodes must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plantlink_wire::frame::{DEFAULT_MAX_FRAME, decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = decode_frame(data, DEFAULT_MAX_FRAME) {
        let mut again = Vec::new();
        encode_frame(&frame, &mut again);
        let (back, _) = decode_frame(&again, DEFAULT_MAX_FRAME).expect("re-encoded frame decodes");
        assert_eq!(back, frame);
        assert!(used <= data.len());
    }
});
