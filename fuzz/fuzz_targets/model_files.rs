//! A model's own files: `model.toml` (settings and limits, resolved as a load does) and
//! `config.json`.
#![no_main]

use distill_serve::checkpoint::ModelConfig;
use distill_serve::repository::{ModelLimits, ModelSettings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, content)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(content) else { return };
    if which % 2 == 0 {
        if let Ok(settings) = toml::from_str::<ModelSettings>(text) {
            let context = 1 + usize::from(which) * 64;
            let _ = settings.limits.or(&ModelLimits::default()).resolve(context);
        }
    } else {
        let _ = ModelConfig::from_json(text);
    }
});
