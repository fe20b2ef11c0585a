//! INT8 exports against FP32 exports of the same checkpoint: logits cosine similarity and KL
//! divergence on a padded batch, for every family, every INT8 layout and a mid-size model.

mod common;

use common::{PROMPTS, Padding, Student, decoder_batch_logits, pad, student};
use distill_serve::checkpoint::Family;
use distill_serve::export::{Int8Format, Precision};
use distill_serve::reference::{cosine, kl_divergence};
use distill_serve::tiny::ShapePreset;

const MIN_COSINE: f32 = 0.99;
const MAX_MEAN_KL: f32 = 0.01;

/// (min cosine, mean KL) over all real positions of the padded prompt batch.
fn compare(st: &Student, family: Family, int8: Precision) -> (f32, f32) {
    let seqs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| st.encode(p)).collect();
    let rows = |precision: Precision, label: &str| -> Vec<Vec<f32>> {
        if family.is_encoder() {
            let mut s = st.encoder(label, precision);
            let (ids, mask, _) = pad(&seqs, Padding::Right, 0);
            let logits = s.forward(&ids, &mask).unwrap();
            logits.outer_iter().map(|r| r.iter().copied().collect()).collect()
        } else {
            let mut s = st.decoder(label, precision);
            decoder_batch_logits(&mut s, &seqs, Padding::Left)
                .into_iter()
                .flatten()
                .collect()
        }
    };
    let (fp32, quantized) = (rows(Precision::Fp32, "fp32"), rows(int8, "int8"));
    let min_cos = fp32
        .iter()
        .zip(&quantized)
        .map(|(a, b)| cosine(a, b))
        .fold(1.0, f32::min);
    let mean_kl = fp32
        .iter()
        .zip(&quantized)
        .map(|(a, b)| kl_divergence(a, b))
        .sum::<f32>()
        / fp32.len() as f32;
    println!(
        "{family:?} {int8:?}: min cosine {min_cos:.5}, mean KL {mean_kl:.6} over {} rows",
        fp32.len()
    );
    (min_cos, mean_kl)
}

fn assert_close(family: Family, shape: ShapePreset, format: Int8Format) {
    let st = student(family, 21, |s| s.shape = shape);
    let (cos, kl) = compare(&st, family, Precision::Int8(format));
    assert!(cos >= MIN_COSINE, "{family:?} {shape:?} {format:?}: min cosine {cos}");
    assert!(kl <= MAX_MEAN_KL, "{family:?} {shape:?} {format:?}: mean KL {kl}");
}

#[test]
fn qwen2_int8_formats_stay_close_to_fp32() {
    for format in [Int8Format::MatMulInteger, Int8Format::MatMulNBits, Int8Format::Qdq] {
        assert_close(Family::Qwen2, ShapePreset::Tiny, format);
    }
}

#[test]
fn llama_int8_stays_close_to_fp32() {
    assert_close(Family::Llama, ShapePreset::Tiny, Int8Format::MatMulInteger);
}

#[test]
fn bert_int8_stays_close_to_fp32() {
    assert_close(Family::Bert, ShapePreset::Tiny, Int8Format::MatMulInteger);
}

#[test]
fn xlm_roberta_int8_stays_close_to_fp32() {
    assert_close(Family::XlmRoberta, ShapePreset::Tiny, Int8Format::MatMulInteger);
}

#[test]
fn mid_size_qwen2_int8_stays_close_to_fp32() {
    // QDQ quantises activations per tensor, so on this model it misses the bar (min cosine
    // about 0.989 at batch 16 in `cargo bench --bench student`): only the per-token and
    // per-block layouts are held to it here.
    for format in [Int8Format::MatMulInteger, Int8Format::MatMulNBits] {
        assert_close(Family::Qwen2, ShapePreset::Mid, format);
    }
}

#[test]
fn int8_file_is_smaller() {
    let st = student(Family::Qwen2, 1, |s| s.shape = ShapePreset::Mid);
    let size = |label, precision| {
        let model = st.export(label, precision, distill_serve::export::ExternalData::Never);
        std::fs::metadata(model).unwrap().len()
    };
    let (fp32, int8) = (size("fp32", Precision::Fp32), size("int8", Precision::DEFAULT_INT8));
    assert!(int8 * 3 < fp32, "int8 {int8} bytes vs fp32 {fp32} bytes");
}

#[test]
fn default_int8_result_does_not_depend_on_batch_mates() {
    let st = student(Family::Qwen2, 2, |s| s.shape = ShapePreset::Mid);
    let seqs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| st.encode(p)).collect();
    let mut session = st.decoder("int8", Precision::DEFAULT_INT8);
    let alone = decoder_batch_logits(&mut session, &seqs[1..2], Padding::Left);
    let batched = decoder_batch_logits(&mut session, &seqs, Padding::Left);
    for (pos, (a, b)) in alone[0].iter().zip(&batched[1]).enumerate() {
        let diff = distill_serve::reference::max_abs_diff(a, b);
        assert!(diff < 1e-3, "position {pos}: alone vs batched differ by {diff}");
    }
}
