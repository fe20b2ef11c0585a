//! JSON schemas of `response_format`, compiled into the structured-output machine and walked
//! over fuzzed bytes.
#![no_main]

use distill_serve::constrain::{ByteMachine, JsonMachine, Terminologies};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (schema, walk) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(schema) = serde_json::from_slice::<serde_json::Value>(schema) else {
        return;
    };
    let Ok(terminologies) = Terminologies::load(&[]) else {
        return;
    };
    if let Ok(machine) = JsonMachine::compile(&schema, &terminologies) {
        let mut states = machine.start();
        for &byte in walk.iter().take(512) {
            states = machine.step(&states, byte);
            if states.is_empty() {
                break;
            }
            let _ = machine.accepts(&states);
        }
    }
});
