//! Opening a decoder version in the engine its execution provider names: ONNX Runtime for
//! the version's exported graph, or the native engine for its Hugging Face checkpoint.

use std::path::Path;

use super::Limits;
use crate::engine::cuda::NativeEngine;
use crate::engine::{DecoderSession, SessionOptions};
use crate::export::{Activations, Attention, Form, MODEL_FILE};
use crate::scheduler;

/// Opens version folder `vdir`'s ONNX graph in ONNX Runtime (warmed up when the limits say
/// so); the session and the form it was exported in.
pub(super) fn open_onnx(
    name: &str,
    version: u32,
    vdir: &Path,
    limits: &Limits,
    context_length: usize,
) -> Result<(DecoderSession, Form), String> {
    let options = SessionOptions {
        intra_threads: limits.intra_threads,
        execution_provider: limits.execution_provider,
        device_id: limits.device_id,
    };
    let mut session = DecoderSession::open(&vdir.join(MODEL_FILE), options).map_err(|e| e.to_string())?;
    if limits.warmup {
        let started = std::time::Instant::now();
        let (rows, tokens) = scheduler::warm_up(&mut session, &limits.batch, context_length)
            .map_err(|e| format!("warming up at the largest prefill the limits allow: {e}"))?;
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(model = %name, rows, tokens, ms, "warmed up");
    }
    tracing::info!(
        model = %name,
        version,
        file = %vdir.join(MODEL_FILE).display(),
        precision = session.precision(),
        attention = if session.fused_attention() { "gqa" } else { "with-past" },
        execution_provider = ?limits.execution_provider,
        layers = session.num_layers(),
        vocab = session.vocab_size(),
        context_length,
        max_batch_size = limits.batch.max_batch_size,
        max_queue_time_ms = limits.admission.max_queue_time.as_millis() as u64,
        intra_threads = limits.intra_threads,
        "model loaded"
    );
    let form = Form {
        attention: if session.fused_attention() {
            Attention::Gqa
        } else {
            Attention::WithPast
        },
        activations: match session.kv_type() {
            ort::value::TensorElementType::Float16 => Activations::Fp16,
            _ => Activations::Fp32,
        },
    };
    Ok((session, form))
}

/// Loads version folder `vdir` into the native engine: its `checkpoint/` (what refresh writes)
/// or, without one, the folder itself as a Hugging Face checkpoint. Returns the engine and the
/// context it serves (a slot's tokens).
pub(super) fn open_native(
    name: &str,
    version: u32,
    vdir: &Path,
    limits: &Limits,
) -> Result<(NativeEngine, usize), String> {
    let checkpoint = match vdir.join("checkpoint") {
        dir if dir.join("config.json").is_file() => dir,
        _ => vdir.to_path_buf(),
    };
    let slots = limits.batch.max_batch_size.max(1);
    let started = std::time::Instant::now();
    let mut engine = NativeEngine::open(
        &checkpoint,
        limits.execution_provider,
        limits.device_id,
        limits.native_weights,
        slots,
        limits.native_slot_tokens,
    )
    .map_err(|e| e.to_string())?;
    engine.set_graphs(limits.native_cuda_graphs);
    tracing::info!(
        model = %name,
        version,
        checkpoint = %checkpoint.display(),
        execution_provider = ?limits.execution_provider,
        device = %engine.device_name(),
        weights = ?limits.native_weights,
        slots,
        slot_tokens = limits.native_slot_tokens,
        ms = started.elapsed().as_millis() as u64,
        "model loaded in the native engine"
    );
    Ok((engine, limits.native_slot_tokens))
}
