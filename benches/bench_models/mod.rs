//! Students the engine benches share across runs: written once under a work folder and exported
//! once per form, so a second run starts at once (the 1.5B shape takes minutes to write).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::ValueEnum;
use distill_serve::checkpoint::Family;
use distill_serve::export::{self, ExternalData, Form, Precision};
use distill_serve::tiny::{ShapePreset, TinySpec, write_tiny};

/// `<work_dir>/<bench>-<shape>/checkpoint`: the random qwen2 student of `shape` (seed 0),
/// written only if missing.
pub fn bench_checkpoint(work_dir: &Path, bench: &str, shape: ShapePreset) -> Result<PathBuf> {
    let name = shape.to_possible_value().context("a shape without a name")?;
    let ckpt = work_dir.join(format!("{bench}-{}", name.get_name())).join("checkpoint");
    if !ckpt.join("config.json").exists() {
        let mut spec = TinySpec::new(Family::Qwen2, 0);
        spec.shape = shape;
        write_tiny(&spec, &ckpt)?;
    }
    Ok(ckpt)
}

/// `<work_dir>/<bench>-<shape>/<label>/model.onnx`: the student of [`bench_checkpoint`]
/// exported at `precision` in `form`, exported only if missing.
pub fn bench_model(
    work_dir: &Path,
    (bench, label): (&str, &str),
    shape: ShapePreset,
    precision: Precision,
    form: Form,
) -> Result<PathBuf> {
    let ckpt = bench_checkpoint(work_dir, bench, shape)?;
    let dir = ckpt.parent().context("a checkpoint without a folder")?;
    let out = dir.join(label);
    let path = out.join(export::MODEL_FILE);
    if !path.exists() {
        export::export_form(&ckpt, &out, precision, ExternalData::Auto, form)?;
    }
    Ok(path)
}
