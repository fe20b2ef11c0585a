//! Admin inputs: refresh job specs (validated, their teacher URL checked against an allow-list)
//! and JSONL dataset uploads.
#![no_main]

use distill_serve::distill::job::{RefreshSpec, parse_prompts_jsonl};
use distill_serve::distill::outbound::OutboundPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(spec) = serde_json::from_slice::<RefreshSpec>(body) {
            let _ = spec.validate();
            let policy = OutboundPolicy::new(&["api.example.com".into(), "*.corp.example:8443".into()]);
            if let Ok(policy) = policy {
                let _ = policy.check(&spec.teacher.url);
            }
        }
    } else if let Ok(text) = std::str::from_utf8(body) {
        let _ = parse_prompts_jsonl(text);
    }
});
