#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| conveyor_wire::fuzzing::image_headers(data));
