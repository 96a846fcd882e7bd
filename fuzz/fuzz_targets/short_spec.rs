#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| virtgate::fuzz::short_spec(data));
