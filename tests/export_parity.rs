//! ONNX exports run by ONNX Runtime against the candle-transformers reference on the same
//! checkpoint: padded batches, incremental decoding with the KV cache, greedy generation.

mod common;

use common::{PROMPTS, Padding, decoder_batch_logits, ort_greedy, pad, student};
use distill_serve::checkpoint::Family;
use distill_serve::export::Precision;
use distill_serve::reference::{ReferenceDecoder, ReferenceEncoder, max_abs_diff};
use distill_serve::tiny::{BertHeadArg, TransformersFormat};
use ndarray::{Array2, s};

const TOLERANCE: f32 = 1e-3;
/// Encoders run one forward without a cache: FP32 agrees to 1e-4.
const ENCODER_TOLERANCE: f32 = 1e-4;

fn assert_decoder_matches_reference(family: Family, tweak: impl FnOnce(&mut distill_serve::tiny::TinySpec)) {
    let st = student(family, 7, tweak);
    let seqs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| st.encode(p)).collect();
    assert!(
        seqs.iter().map(Vec::len).min() < seqs.iter().map(Vec::len).max(),
        "lengths must differ"
    );
    let mut reference = ReferenceDecoder::load(&st.checkpoint).unwrap();
    let mut session = st.decoder("fp32", Precision::Fp32);
    for padding in [Padding::Left, Padding::Right] {
        let ort = decoder_batch_logits(&mut session, &seqs, padding);
        for (b, seq) in seqs.iter().enumerate() {
            let want = reference.logits(seq).unwrap();
            for (pos, (got, want)) in ort[b].iter().zip(&want).enumerate() {
                let diff = max_abs_diff(got, want);
                assert!(
                    diff < TOLERANCE,
                    "{family:?} {padding:?} seq {b} pos {pos}: max abs diff {diff}"
                );
            }
        }
    }
}

#[test]
fn qwen2_fp32_matches_candle_on_padded_batch() {
    assert_decoder_matches_reference(Family::Qwen2, |_| {});
}

#[test]
fn llama_fp32_matches_candle_on_padded_batch() {
    assert_decoder_matches_reference(Family::Llama, |_| {});
}

#[test]
fn transformers_5x_layout_sharded_untied_qwen2_matches_candle() {
    assert_decoder_matches_reference(Family::Qwen2, |s| {
        s.format = TransformersFormat::V5;
        s.shards = 3;
        s.tie_word_embeddings = Some(false);
        s.num_kv_heads = Some(1);
        s.rope_theta = 1_000_000.0;
    });
}

fn assert_encoder_matches_reference(family: Family, head: BertHeadArg, padding: Padding, pad_id: u32) {
    let st = student(family, 3, |s| s.bert_head = head);
    let seqs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| st.encode(p)).collect();
    let reference = ReferenceEncoder::load(&st.checkpoint).unwrap();
    let mut session = st.encoder("fp32", Precision::Fp32);
    let (ids, mask, _) = pad(&seqs, padding, pad_id);
    let logits = session.forward(&ids, &mask).unwrap();
    let longest = ids.ncols();
    for (b, seq) in seqs.iter().enumerate() {
        let want = reference.logits(seq).unwrap();
        let start = match padding {
            Padding::Left => longest - seq.len(),
            Padding::Right => 0,
        };
        let got: Vec<Vec<f32>> = match head {
            BertHeadArg::Sequence => vec![logits.slice(s![b, ..]).to_vec()],
            BertHeadArg::Token | BertHeadArg::Embedding => (start..start + seq.len())
                .map(|i| logits.slice(s![b, i, ..]).to_vec())
                .collect(),
        };
        assert_eq!(got.len(), want.len());
        for (got, want) in got.iter().zip(&want) {
            let diff = max_abs_diff(got, want);
            assert!(
                diff < ENCODER_TOLERANCE,
                "{family:?} {head:?} {padding:?} seq {b}: max abs diff {diff}"
            );
        }
    }
}

#[test]
fn bert_sequence_classifier_matches_candle_on_padded_batch() {
    assert_encoder_matches_reference(Family::Bert, BertHeadArg::Sequence, Padding::Right, 0);
}

#[test]
fn bert_token_classifier_matches_candle_on_padded_batch() {
    assert_encoder_matches_reference(Family::Bert, BertHeadArg::Token, Padding::Right, 0);
}

/// A bare `BertModel` (tensors without the `bert.` prefix, as sentence-transformers saves
/// them): the last hidden states of every real position.
#[test]
fn bert_embedding_model_matches_candle_on_padded_batch() {
    assert_encoder_matches_reference(Family::Bert, BertHeadArg::Embedding, Padding::Right, 0);
}

/// XLM-RoBERTa against candle's own implementation (its classification head, positions
/// counted from the padding id): each head, padded with `<pad>` (id 1); per-token heads also
/// padded on the left (a sequence head reads the first token, which must be real).
#[test]
fn xlm_roberta_heads_match_candle_on_padded_batches() {
    assert_encoder_matches_reference(Family::XlmRoberta, BertHeadArg::Sequence, Padding::Right, 1);
    for head in [BertHeadArg::Token, BertHeadArg::Embedding] {
        for padding in [Padding::Right, Padding::Left] {
            assert_encoder_matches_reference(Family::XlmRoberta, head, padding, 1);
        }
    }
}

/// 16 decode steps with the KV cache give the logits of recomputing the whole sequence, on a
/// left-padded batch of two.
fn assert_incremental_equals_full(family: Family) {
    let st = student(family, 11, |_| {});
    let mut session = st.decoder("fp32", Precision::Fp32);
    let prompts = [st.encode(PROMPTS[0]), st.encode(PROMPTS[1])];
    let steps = 16;
    let continuation: Vec<Vec<u32>> = (0..2)
        .map(|b| (0..steps).map(|i| (7 * i + 13 * b + 5) as u32).collect())
        .collect();
    let full: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&continuation)
        .map(|(p, c)| [p.clone(), c.clone()].concat())
        .collect();
    let want = decoder_batch_logits(&mut session, &full, Padding::Left);

    let (ids, mut mask, pos) = pad(&prompts, Padding::Left, 0);
    let cache = session.empty_cache(2).unwrap();
    // Generation only copies out the last position's logits.
    let (last, mut cache) = session.forward_last(&ids, &mask, &pos, cache).unwrap();
    assert_eq!(last.dim(), (2, 1, want[0][0].len()));
    for b in 0..2 {
        let diff = max_abs_diff(&last.slice(s![b, 0, ..]).to_vec(), &want[b][prompts[b].len() - 1]);
        assert!(diff < 1e-4, "{family:?} seq {b} prefill: max abs diff {diff}");
    }
    let mut next_pos: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    for step in 0..steps {
        let ids = Array2::from_shape_fn((2, 1), |(b, _)| i64::from(continuation[b][step]));
        let pos = Array2::from_shape_fn((2, 1), |(b, _)| next_pos[b]);
        mask.push_column(ndarray::ArrayView1::from(&[1, 1])).unwrap();
        let (logits, c) = session.forward(&ids, &mask, &pos, cache).unwrap();
        cache = c;
        for b in 0..2 {
            let got = logits.slice(s![b, 0, ..]).to_vec();
            let diff = max_abs_diff(&got, &want[b][prompts[b].len() + step]);
            assert!(diff < 1e-4, "{family:?} seq {b} step {step}: max abs diff {diff}");
            next_pos[b] += 1;
        }
    }
    assert_eq!(cache.len(), ids.ncols() + steps);
}

#[test]
fn qwen2_incremental_decode_equals_full_recompute() {
    assert_incremental_equals_full(Family::Qwen2);
}

#[test]
fn llama_incremental_decode_equals_full_recompute() {
    assert_incremental_equals_full(Family::Llama);
}

fn assert_greedy_identical(family: Family) {
    let st = student(family, 5, |_| {});
    let prompt = st.encode(PROMPTS[0]);
    let want = ReferenceDecoder::load(&st.checkpoint)
        .unwrap()
        .greedy(&prompt, 32)
        .unwrap();
    let got = ort_greedy(&mut st.decoder("fp32", Precision::Fp32), &prompt, 32);
    assert_eq!(got, want, "{family:?}: greedy tokens differ");
    let distinct: std::collections::HashSet<_> = got.iter().collect();
    assert!(
        distinct.len() > 1,
        "a constant continuation would make the test vacuous: {got:?}"
    );
}

#[test]
fn qwen2_greedy_32_tokens_identical_to_candle() {
    assert_greedy_identical(Family::Qwen2);
}

#[test]
fn llama_greedy_32_tokens_identical_to_candle() {
    assert_greedy_identical(Family::Llama);
}

#[test]
fn llama3_rope_scaling_matches_candle() {
    // A Llama 3.1 style frequency schedule; the small original context makes every band
    // (kept, scaled, smoothed) occur among the 8 frequencies of a 16-wide head.
    let st = student(Family::Llama, 8, |s| s.rope_theta = 500_000.0);
    let path = st.checkpoint.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["rope_scaling"] = serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64
    });
    std::fs::write(&path, config.to_string()).unwrap();
    let seqs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| st.encode(p)).collect();
    let mut reference = ReferenceDecoder::load(&st.checkpoint).unwrap();
    let scaled = decoder_batch_logits(&mut st.decoder("fp32", Precision::Fp32), &seqs, Padding::Left);
    let plain = {
        let mut c = config.clone();
        c.as_object_mut().unwrap().remove("rope_scaling");
        std::fs::write(&path, c.to_string()).unwrap();
        let logits = decoder_batch_logits(&mut st.decoder("plain", Precision::Fp32), &seqs, Padding::Left);
        std::fs::write(&path, config.to_string()).unwrap();
        logits
    };
    let mut changed = 0.0f32;
    for (b, seq) in seqs.iter().enumerate() {
        let want = reference.logits(seq).unwrap();
        for (pos, got) in scaled[b].iter().enumerate() {
            let diff = max_abs_diff(got, &want[pos]);
            assert!(diff < TOLERANCE, "seq {b} pos {pos}: max abs diff {diff}");
            changed = changed.max(max_abs_diff(got, &plain[b][pos]));
        }
    }
    assert!(
        changed > 1e-2,
        "the scaling must change the logits (max change {changed})"
    );
}
