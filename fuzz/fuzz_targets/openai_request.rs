//! The request bodies of `/v1/completions` and `/v1/chat/completions`, through the same
//! parsing and translation the handlers run before validation.
#![no_main]

use distill_serve::api::openai::{ChatRequest, CompletionRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(request) = serde_json::from_slice::<CompletionRequest>(body) {
            let _ = request.into_request(None);
        }
    } else if let Ok(request) = serde_json::from_slice::<ChatRequest>(body) {
        let _ = request.into_request(None);
    }
});
