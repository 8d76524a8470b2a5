#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| truba_fuzz_targets::snapshot_recovery(data));
