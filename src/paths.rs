//! Where the project keeps what it downloads; a leaf module every other one may use.

use std::path::PathBuf;

/// Where `scripts/setup.sh` installs what the project downloads (the ONNX Runtime library, the
/// ICD-10-CM release): `${XDG_CACHE_HOME:-~/.cache}/distill-serve`.
pub fn setup_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("distill-serve")
}
