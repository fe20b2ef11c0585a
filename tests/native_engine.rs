//! The native decoder engine (`src/engine/cuda/`): its step, run on the CPU reference of the
//! kernels, against candle-transformers on the same checkpoint; continuous batching against
//! each sequence alone; bad steps and models as errors. The CUDA backend against this one is in
//! `tests/gpu_checks/` (on the emulated GPU in `tests/kernel_emulation.rs`, on a real one in
//! `tests/kernels.rs`).

mod common;

use common::native::{assert_matches_onnx_runtime, greedy_alone, prompt_logits};
use common::{PROMPTS, student};
use distill_serve::checkpoint::Family;
use distill_serve::engine::cuda::reference::CpuBackend;
use distill_serve::engine::cuda::{NativeDecoder, NativeError, StepRows, WeightFormat};
use distill_serve::generate::argmax;
use distill_serve::reference::{ReferenceDecoder, cosine};
use distill_serve::tiny::ShapePreset;

fn assert_matches_candle(family: Family, format: WeightFormat, min_cosine: f32) {
    let st = student(family, 7, |_| {});
    let mut reference = ReferenceDecoder::load(&st.checkpoint).unwrap();
    let mut engine = NativeDecoder::load(&st.checkpoint, CpuBackend, format, 3, 128).unwrap();
    for (slot, text) in PROMPTS.iter().enumerate() {
        let prompt = st.encode(text);
        let want = reference.logits(&prompt).unwrap();
        let got = prompt_logits(&mut engine, slot as u32, &prompt);
        for (position, (got, want)) in got.iter().zip(&want).enumerate() {
            let similarity = cosine(got, want);
            assert!(
                similarity >= min_cosine,
                "{family:?} {format:?} slot {slot} position {position}: cosine {similarity}"
            );
        }
    }
}

#[test]
fn fp16_qwen2_matches_candle() {
    assert_matches_candle(Family::Qwen2, WeightFormat::Fp16, 0.999);
}

#[test]
fn fp16_llama_matches_candle() {
    assert_matches_candle(Family::Llama, WeightFormat::Fp16, 0.999);
}

#[test]
fn bf16_qwen2_and_llama_match_candle() {
    assert_matches_candle(Family::Qwen2, WeightFormat::Bf16, 0.999);
    assert_matches_candle(Family::Llama, WeightFormat::Bf16, 0.999);
}

#[test]
fn int8_qwen2_and_llama_stay_close_to_candle() {
    assert_matches_candle(Family::Qwen2, WeightFormat::Int8, 0.99);
    assert_matches_candle(Family::Llama, WeightFormat::Int8, 0.99);
}

#[test]
fn the_cpu_backend_matches_onnx_runtime_on_the_same_checkpoint() {
    for shape in [ShapePreset::Tiny, ShapePreset::Mid] {
        assert_matches_onnx_runtime(|| CpuBackend, shape, 32);
    }
}

#[test]
fn untied_grouped_query_checkpoints_match_candle() {
    let st = student(Family::Qwen2, 3, |s| {
        s.tie_word_embeddings = Some(false);
        s.num_kv_heads = Some(1);
        s.rope_theta = 1_000_000.0;
    });
    let mut reference = ReferenceDecoder::load(&st.checkpoint).unwrap();
    let mut engine = NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Fp16, 1, 64).unwrap();
    let prompt = st.encode(PROMPTS[0]);
    let (tokens, _) = greedy_alone(&mut engine, &prompt, 16);
    assert_eq!(tokens, reference.greedy(&prompt, 16).unwrap());
}

/// Four sequences through three slots: B joins while A decodes (its prompt rows in A's decode
/// step), C joins later, A ends and D takes its slot. Each gets exactly what it gets alone.
#[test]
fn continuous_batching_gives_each_sequence_its_output_alone() {
    let st = student(Family::Qwen2, 11, |_| {});
    let prompts: Vec<Vec<u32>> = [PROMPTS[0], PROMPTS[1], PROMPTS[2], "Code: I10"]
        .iter()
        .map(|p| st.encode(p))
        .collect();
    let steps = 10;
    let mut alone = NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Int8, 1, 128).unwrap();
    let expected: Vec<_> = prompts.iter().map(|p| greedy_alone(&mut alone, p, steps)).collect();

    struct Running {
        seq: usize,
        slot: u32,
        tokens: Vec<u32>,
        logits: Vec<Vec<f32>>,
    }
    let mut engine = NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Int8, 3, 128).unwrap();
    // (step, sequence, slot) of each join.
    let joins = [(0, 0, 0u32), (3, 1, 1), (5, 2, 2), (0, 3, 0)];
    let mut running: Vec<Running> = Vec::new();
    let mut done: Vec<Running> = Vec::new();
    let mut d_joined = false;
    for step in 0..40 {
        let mut rows = StepRows::default();
        let mut last_row = Vec::new();
        for r in &running {
            let position = prompts[r.seq].len() + r.tokens.len() - 1;
            last_row.push(rows.push(*r.tokens.last().unwrap(), r.slot, position as u32));
        }
        let a_done = done.iter().any(|r| r.seq == 0);
        for &(at, seq, slot) in &joins {
            let joins_now = if seq == 3 { a_done && !d_joined } else { at == step };
            if !joins_now {
                continue;
            }
            d_joined |= seq == 3;
            last_row.push(rows.push_prompt(slot, &prompts[seq]));
            running.push(Running {
                seq,
                slot,
                tokens: Vec::new(),
                logits: Vec::new(),
            });
        }
        if rows.is_empty() {
            break;
        }
        let logits = engine.step(&rows, &last_row).unwrap();
        for (r, l) in running.iter_mut().zip(logits) {
            r.tokens.push(argmax(&l));
            r.logits.push(l);
        }
        let (finished, still): (Vec<_>, Vec<_>) = running.into_iter().partition(|r| r.tokens.len() == steps);
        done.extend(finished);
        running = still;
    }
    assert_eq!(done.len(), 4, "every sequence finished");
    for r in &done {
        let (tokens, logits) = &expected[r.seq];
        assert_eq!(&r.tokens, tokens, "sequence {}", r.seq);
        assert_eq!(
            &r.logits, logits,
            "sequence {}: batched logits differ from alone",
            r.seq
        );
    }
}

#[test]
fn bad_steps_are_errors_before_any_kernel_runs() {
    let st = student(Family::Llama, 5, |_| {});
    let mut engine = NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Int8, 2, 16).unwrap();
    let vocab = engine.config().vocab_size as u32;
    let cases = [
        (vec![1], vec![2], vec![0], "slot 2"),
        (vec![1], vec![0], vec![16], "position 16"),
        (vec![vocab], vec![0], vec![0], "token"),
    ];
    for (tokens, slots, positions, says) in cases {
        let rows = StepRows {
            tokens,
            slots,
            positions,
        };
        match engine.step(&rows, &[0]) {
            Err(NativeError::Shape(why)) => assert!(why.contains(says), "{why}"),
            other => panic!("expected a shape error naming {says}, got {other:?}"),
        }
    }
    let rows = StepRows {
        tokens: vec![1, 2],
        slots: vec![0],
        positions: vec![0, 1],
    };
    assert!(matches!(engine.step(&rows, &[0]), Err(NativeError::Shape(_))));
    let ok = StepRows {
        tokens: vec![1],
        slots: vec![0],
        positions: vec![0],
    };
    assert!(
        matches!(engine.step(&ok, &[1]), Err(NativeError::Shape(_))),
        "logits of a row the step lacks"
    );
    assert_eq!(engine.step(&ok, &[0]).unwrap().len(), 1);
}

#[test]
fn an_encoder_checkpoint_is_refused() {
    let st = student(Family::Bert, 1, |_| {});
    match NativeDecoder::load(&st.checkpoint, CpuBackend, WeightFormat::Int8, 1, 8) {
        Err(NativeError::Unsupported(why)) => assert!(why.contains("encoder"), "{why}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("an encoder loaded as a decoder"),
    }
}
