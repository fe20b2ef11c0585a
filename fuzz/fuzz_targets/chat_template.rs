//! Chat templates, hostile ones included, rendered over fuzzed messages: errors are fine,
//! panics and endless renders are not (templates run on fuel).
#![no_main]

use distill_serve::tokenize::{ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Template, then messages, separated by the first NUL.
    let (source, rest) = text.split_once('\0').unwrap_or((text, "hello"));
    let messages: Vec<ChatMessage> = rest
        .split('\0')
        .enumerate()
        .map(|(i, content)| ChatMessage {
            role: ["system", "user", "assistant"][i % 3].into(),
            content: content.into(),
        })
        .collect();
    if let Ok(template) = ChatTemplate::new(source.into(), Some("<s>".into()), Some("</s>".into())) {
        let _ = template.render(&messages);
    }
});
