//! Checkpoint -> ONNX: the graph is written from Rust with protobuf types of the ONNX IR, in
//! FP32 or with every linear layer's weights in INT8.

mod decoder;
mod emit;
mod encoder;
mod graph;
mod quantize;

/// Generated protobuf types of the ONNX IR subset in `proto/onnx.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::checkpoint::{Checkpoint, ModelConfig, tensor_specs};
use emit::Emitter;
use graph::GraphBuilder;

/// How INT8 linear layers are expressed for ONNX Runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum Int8Format {
    /// `MatMulInteger` on per-channel int8 weights and uint8 activations quantised per token
    /// (symmetric, one scale per row), so a sequence's result does not depend on its batch.
    #[value(name = "matmul-integer")]
    #[serde(rename = "matmul-integer")]
    #[default]
    MatMulInteger,
    /// ONNX Runtime's `MatMulNBits` with 8 bits, blocks of 32 along the input axis, int8
    /// compute (`accuracy_level` 4).
    #[value(name = "matmul-nbits")]
    #[serde(rename = "matmul-nbits")]
    MatMulNBits,
    /// Quantize/dequantize pairs around a float `MatMul` (`DynamicQuantizeLinear`, one scale per
    /// tensor: fastest, but a row's result depends on its batch-mates), left to ONNX Runtime's
    /// QDQ fusion.
    #[value(name = "qdq")]
    #[serde(rename = "qdq")]
    Qdq,
}

/// How a decoder's attention is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Attention {
    /// Standard ONNX operators in Optimum's with-past layout: rows left-padded, the cache grown
    /// by a `Concat` each step. Runs on any ONNX runtime.
    #[default]
    WithPast,
    /// ONNX Runtime's fused `GroupQueryAttention` (com.microsoft) with rotary embedding inside:
    /// rows right-padded with their own lengths, no `position_ids`. The server keeps its cache
    /// in one buffer that the op extends in place (the engine's `SlotCache`).
    Gqa,
}

impl Attention {
    fn label(self) -> &'static str {
        match self {
            Attention::WithPast => "with-past",
            Attention::Gqa => FUSED_ATTENTION_LABEL,
        }
    }
}

/// The float type a graph computes in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Activations {
    /// FP32 throughout: what the CPU runs fastest.
    #[default]
    Fp32,
    /// FP16 activations, cache and float weights (RMS normalisation accumulates in FP32), and
    /// logits of each row's last position only, cast to FP32: the GPU form. Needs fused
    /// attention (ONNX Runtime's CUDA `GroupQueryAttention` runs in FP16 only) and FP32 or
    /// `matmul-nbits` weights.
    Fp16,
}

/// The layout and types of an exported decoder graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Form {
    pub attention: Attention,
    pub activations: Activations,
}

impl Form {
    /// The GPU form: fused attention, FP16 activations, last-position logits.
    pub const GPU: Form = Form {
        attention: Attention::Gqa,
        activations: Activations::Fp16,
    };
}

/// The `distill_serve.attention` metadata of an export with fused attention.
pub const FUSED_ATTENTION_LABEL: &str = "gqa";

/// Numeric precision of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// All weights in `f32`.
    Fp32,
    /// Linear layers and the token embedding in int8.
    Int8(Int8Format),
}

impl Precision {
    /// The INT8 layout the README recommends: the fastest one that stayed accurate in
    /// `cargo bench --bench student`.
    pub const DEFAULT_INT8: Precision = Precision::Int8(Int8Format::MatMulInteger);

    fn label(self, activations: Activations) -> &'static str {
        match self {
            Precision::Fp32 if activations == Activations::Fp16 => "fp16",
            Precision::Fp32 => "fp32",
            Precision::Int8(Int8Format::MatMulInteger) => "int8-matmul-integer",
            Precision::Int8(Int8Format::MatMulNBits) => "int8-matmul-nbits",
            Precision::Int8(Int8Format::Qdq) => "int8-qdq",
        }
    }
}

/// When weights go to a separate `model.onnx_data` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExternalData {
    /// Only when the model would pass protobuf's 2 GB limit.
    Auto,
    Always,
    Never,
}

/// File name of the exported graph.
pub const MODEL_FILE: &str = "model.onnx";
/// File name of the external weights, when used.
pub const EXTERNAL_DATA_FILE: &str = "model.onnx_data";
/// Above this estimated size, `ExternalData::Auto` writes external data: protobuf caps a
/// message at 2 GiB, and a model this large is better mapped from disk than parsed in memory.
const EXTERNAL_THRESHOLD: u64 = 1 << 30;

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    /// Files written, the graph first.
    pub files: Vec<PathBuf>,
    /// Bytes of the graph plus external data.
    pub model_bytes: u64,
    /// Precision label, e.g. `fp32` or `int8-matmul-integer`.
    pub precision: &'static str,
    /// Attention label of a decoder (`with-past` or `gqa`); `null` for an encoder.
    pub attention: Option<&'static str>,
}

/// The attention the `export` command writes when not told: fused where ONNX Runtime's op takes
/// the decoder's head size (it is faster in the server: README, Serving benchmark), with-past
/// otherwise; encoders have neither.
pub fn preferred_attention(checkpoint_dir: &Path) -> Result<Attention> {
    let path = checkpoint_dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(match ModelConfig::from_json(&text)? {
        ModelConfig::Decoder(c) if c.head_dim.is_multiple_of(16) => Attention::Gqa,
        _ => Attention::WithPast,
    })
}

/// sentence-transformers files an embedding checkpoint carries: its modules (a `Normalize`
/// module means normalised embeddings) and its pooling.
pub const SENTENCE_TRANSFORMERS_FILES: [&str; 2] = ["modules.json", "1_Pooling/config.json"];

/// Exports the checkpoint in `checkpoint_dir` to `out_dir/model.onnx`, copying `config.json`
/// and the tokenizer files beside it; attention in the with-past layout.
pub fn export(
    checkpoint_dir: &Path,
    out_dir: &Path,
    precision: Precision,
    external: ExternalData,
) -> Result<ExportReport> {
    export_with_attention(checkpoint_dir, out_dir, precision, external, Attention::WithPast)
}

/// As [`export`], with a decoder's attention written as `attention` says.
pub fn export_with_attention(
    checkpoint_dir: &Path,
    out_dir: &Path,
    precision: Precision,
    external: ExternalData,
    attention: Attention,
) -> Result<ExportReport> {
    let form = Form {
        attention,
        ..Form::default()
    };
    export_form(checkpoint_dir, out_dir, precision, external, form)
}

/// As [`export`], in the layout and types `form` says.
pub fn export_form(
    checkpoint_dir: &Path,
    out_dir: &Path,
    precision: Precision,
    external: ExternalData,
    form: Form,
) -> Result<ExportReport> {
    let Form { attention, activations } = form;
    if activations == Activations::Fp16 {
        anyhow::ensure!(
            attention == Attention::Gqa,
            "FP16 activations need fused attention (--attention gqa)"
        );
        anyhow::ensure!(
            matches!(precision, Precision::Fp32 | Precision::Int8(Int8Format::MatMulNBits)),
            "FP16 activations take FP32 weights (stored as FP16) or --int8-format matmul-nbits"
        );
    }
    let ckpt = Checkpoint::open(checkpoint_dir)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let bytes_per_weight = if precision == Precision::Fp32 { 4 } else { 1 };
    let estimate: u64 = tensor_specs(&ckpt.config)
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64 * bytes_per_weight)
        .sum();
    let use_external = match external {
        ExternalData::Always => true,
        ExternalData::Never => false,
        ExternalData::Auto => estimate > EXTERNAL_THRESHOLD,
    };
    let model_path = out_dir.join(MODEL_FILE);
    let data_path = out_dir.join(EXTERNAL_DATA_FILE);
    if !use_external && data_path.exists() {
        std::fs::remove_file(&data_path)?;
    }
    let family = ckpt.config.family();
    let mut builder = GraphBuilder::new(family.model_type(), use_external.then_some(data_path.as_path()))?;
    if activations == Activations::Fp16 {
        builder.set_float(graph::Elem::F16);
    }
    let mut e = Emitter::new(builder, &ckpt.weights, precision);
    match &ckpt.config {
        ModelConfig::Decoder(c) => decoder::build(&mut e, c, attention)?,
        ModelConfig::Encoder(c) => encoder::build(&mut e, c)?,
    }
    let metadata = [
        ("distill_serve.family", family.model_type().to_string()),
        ("distill_serve.precision", precision.label(activations).to_string()),
        ("distill_serve.attention", attention.label().to_string()),
        ("distill_serve.activations", format!("{activations:?}").to_lowercase()),
    ];
    let mut files = e.b.finish(&model_path, &metadata)?;
    let model_bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()))
        .sum::<Result<u64, _>>()?;
    for src in std::iter::once(ckpt.dir.join("config.json").as_path()).chain(ckpt.tokenizer.files()) {
        let name = src.file_name().context("tokenizer file without a name")?;
        let dst = out_dir.join(name);
        std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
        files.push(dst);
    }
    // sentence-transformers' pooling and normalisation, which the server applies.
    for name in SENTENCE_TRANSFORMERS_FILES {
        let src = ckpt.dir.join(name);
        if src.is_file() {
            let dst = out_dir.join(name);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
            files.push(dst);
        }
    }
    Ok(ExportReport {
        files,
        model_bytes,
        precision: precision.label(activations),
        attention: matches!(ckpt.config, ModelConfig::Decoder(_)).then(|| attention.label()),
    })
}

/// Writes a one-node model (`y = x · W`, `x` of shape [1, 8]) to `path`: the smallest graph
/// that shows an execution provider can load and run, for `distill-serve doctor`.
pub fn write_probe_model(path: &Path) -> Result<()> {
    let mut g = GraphBuilder::new("probe", None)?;
    let weights: Vec<f32> = (0..64).map(|i| (i % 9) as f32 / 8.0).collect();
    let w = g.float_init("w", &[8, 8], &weights)?;
    g.input("x", graph::Elem::F32, &[graph::Dim::Fixed(1), graph::Dim::Fixed(8)]);
    g.node_in(graph::ONNX_DOMAIN, "MatMul", &["x", &w], &["y"], Vec::new());
    g.output("y", graph::Elem::F32, &[graph::Dim::Fixed(1), graph::Dim::Fixed(8)]);
    g.finish(path, &[])?;
    Ok(())
}
