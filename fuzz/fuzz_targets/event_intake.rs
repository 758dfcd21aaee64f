#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| conveyor_wire::fuzzing::event_intake(data));
