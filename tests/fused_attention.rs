//! The decoder graph with ONNX Runtime's fused `GroupQueryAttention` (`--attention gqa`)
//! against the with-past graph: each prompt alone through the with-past graph is the
//! reference; the fused graph runs them as one right-padded batch, prefill and greedy decode
//! steps with rows of different lengths, and must give the same logits (1e-4, FP32) at every
//! real position, for grouped (qwen2) and plain multi-head (llama) layouts. In INT8 a row's
//! logits do not depend on its batch-mates. The GPU form (FP16 activations and cache, FP16 or
//! `MatMulNBits` INT8 weights, last-position logits) runs here on the CPU provider through the
//! server's slot cache and stays close to the FP32 graph.

mod common;

use std::borrow::Cow;

use common::{PROMPTS, student};
use distill_serve::checkpoint::Family;
use distill_serve::engine::{DecoderSession, SessionOptions, SlotCache, open_session};
use distill_serve::export::{self, Attention, ExternalData, Form, Int8Format, Precision};
use distill_serve::reference::{cosine, max_abs_diff};
use ndarray::{Array2, Array4, Ix3, s};
use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor};

const STEPS: usize = 4;
const TOLERANCE: f32 = 1e-4;

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::MIN), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
        .0 as u32
}

/// One prompt alone through the with-past graph: the logits of every prompt position, then of
/// each greedy step, and the tokens it chose.
fn reference(session: &mut DecoderSession, prompt: &[u32]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<u32>) {
    let len = prompt.len();
    let ids = Array2::from_shape_fn((1, len), |(_, i)| i64::from(prompt[i]));
    let mask = Array2::<i64>::ones((1, len));
    let pos = Array2::from_shape_fn((1, len), |(_, i)| i as i64);
    let (logits, mut cache) = session
        .forward(&ids, &mask, &pos, session.empty_cache(1).unwrap())
        .unwrap();
    let prefill: Vec<Vec<f32>> = (0..len).map(|i| logits.slice(s![0, i, ..]).to_vec()).collect();
    let mut next = argmax(prefill.last().unwrap());
    let (mut steps, mut tokens) = (Vec::new(), Vec::new());
    for k in 0..STEPS {
        tokens.push(next);
        let ids = Array2::from_elem((1, 1), i64::from(next));
        let mask = Array2::<i64>::ones((1, len + k + 1));
        let pos = Array2::from_elem((1, 1), (len + k) as i64);
        let (logits, grown) = session.forward(&ids, &mask, &pos, cache).unwrap();
        cache = grown;
        let row = logits.slice(s![0, 0, ..]).to_vec();
        next = argmax(&row);
        steps.push(row);
    }
    (prefill, steps, tokens)
}

/// Runs the fused graph once: logits `[batch, seq, vocab]` and the presents, in layer order.
fn run_fused(
    session: &mut ort::session::Session,
    ids: &Array2<i64>,
    mask: &Array2<i64>,
    past: Vec<DynValue>,
    layers: usize,
) -> (ndarray::Array3<f32>, Vec<DynValue>) {
    let mut inputs: Vec<(Cow<str>, SessionInputValue)> = vec![
        ("input_ids".into(), Tensor::from_array(ids.clone()).unwrap().into()),
        (
            "attention_mask".into(),
            Tensor::from_array(mask.clone()).unwrap().into(),
        ),
    ];
    for (i, value) in past.into_iter().enumerate() {
        let kind = if i % 2 == 0 { "key" } else { "value" };
        inputs.push((format!("past_key_values.{}.{kind}", i / 2).into(), value.into()));
    }
    let mut outputs = session.run(inputs).unwrap();
    let logits = outputs["logits"]
        .try_extract_array::<f32>()
        .unwrap()
        .into_dimensionality::<Ix3>()
        .unwrap()
        .to_owned();
    let presents = (0..layers)
        .flat_map(|l| [format!("present.{l}.key"), format!("present.{l}.value")])
        .map(|name| outputs.remove(&name).unwrap())
        .collect();
    (logits, presents)
}

/// Exports `student` with fused attention at `precision` and opens it.
fn fused_session(student: &common::Student, precision: Precision) -> (std::path::PathBuf, ort::session::Session) {
    let dir = student.dir.path().join(format!("gqa-{precision:?}"));
    export::export_with_attention(
        &student.checkpoint,
        &dir,
        precision,
        ExternalData::Never,
        Attention::Gqa,
    )
    .unwrap();
    let path = dir.join(export::MODEL_FILE);
    let session = open_session(&path, SessionOptions::default()).unwrap();
    (path, session)
}

/// `prompts` as one right-padded batch (row b in columns 0..len_b), its attention mask `extra`
/// steps later, and an empty cache for `layers` layers.
struct Batch {
    ids: Array2<i64>,
    lengths: Vec<usize>,
    width: usize,
}

impl Batch {
    fn new(prompts: &[Vec<u32>]) -> Self {
        let width = prompts.iter().map(Vec::len).max().unwrap();
        let ids = Array2::from_shape_fn((prompts.len(), width), |(b, i)| {
            prompts[b].get(i).map_or(0, |&t| i64::from(t))
        });
        Self {
            ids,
            lengths: prompts.iter().map(Vec::len).collect(),
            width,
        }
    }

    fn mask(&self, extra: usize) -> Array2<i64> {
        Array2::from_shape_fn((self.lengths.len(), self.width + extra), |(b, i)| {
            i64::from(i < self.lengths[b] + extra)
        })
    }

    fn empty_cache(&self, session: &ort::session::Session, layers: usize) -> Vec<DynValue> {
        let meta = session
            .inputs()
            .iter()
            .find(|i| i.name() == "past_key_values.0.key")
            .unwrap()
            .dtype()
            .clone();
        let (kv_heads, head_dim) = match meta {
            ort::value::ValueType::Tensor { shape, .. } => (shape[1] as usize, shape[3] as usize),
            other => panic!("{other:?}"),
        };
        let rows = self.lengths.len();
        (0..2 * layers)
            .map(|_| {
                Tensor::from_array(Array4::<f32>::zeros((rows, kv_heads, 0, head_dim)))
                    .unwrap()
                    .into_dyn()
            })
            .collect()
    }
}

fn fused_matches_the_with_past_graph(family: Family, num_kv_heads: Option<usize>) {
    let student = student(family, 11, |spec| spec.num_kv_heads = num_kv_heads);
    let mut with_past = student.decoder("with-past", Precision::Fp32);
    let (fused_path, mut fused) = fused_session(&student, Precision::Fp32);
    let layers = with_past.num_layers();

    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| student.encode(p)).collect();
    let expected: Vec<_> = prompts.iter().map(|p| reference(&mut with_past, p)).collect();

    let batch = Batch::new(&prompts);
    let (rows, mask) = (prompts.len(), |extra| batch.mask(extra));
    let empty = batch.empty_cache(&fused, layers);
    let (logits, mut past) = run_fused(&mut fused, &batch.ids, &mask(0), empty, layers);
    for (b, (prefill, _, _)) in expected.iter().enumerate() {
        for (i, row) in prefill.iter().enumerate() {
            let got = logits.slice(s![b, i, ..]).to_vec();
            let diff = max_abs_diff(&got, row);
            assert!(diff <= TOLERANCE, "{family:?} row {b} position {i}: {diff}");
        }
    }
    for k in 0..STEPS {
        let ids = Array2::from_shape_fn((rows, 1), |(b, _)| i64::from(expected[b].2[k]));
        let (logits, presents) = run_fused(&mut fused, &ids, &mask(k + 1), past, layers);
        past = presents;
        for (b, (_, steps, _)) in expected.iter().enumerate() {
            let got = logits.slice(s![b, 0, ..]).to_vec();
            let diff = max_abs_diff(&got, &steps[k]);
            assert!(diff <= TOLERANCE, "{family:?} row {b} step {k}: {diff}");
        }
    }

    // The server knows the graph by its metadata and runs it with right-padded rows.
    let opened = DecoderSession::open(&fused_path, SessionOptions::default()).unwrap();
    assert!(opened.fused_attention());
    assert!(!with_past.fused_attention());
}

#[test]
fn fused_attention_matches_with_past_on_grouped_heads() {
    fused_matches_the_with_past_graph(Family::Qwen2, None);
}

#[test]
fn fused_attention_matches_with_past_on_plain_multi_head_attention() {
    fused_matches_the_with_past_graph(Family::Llama, Some(4));
}

#[test]
fn int8_fused_rows_do_not_depend_on_their_batch() {
    let student = student(Family::Qwen2, 12, |_| {});
    let (_, mut fused) = fused_session(&student, Precision::DEFAULT_INT8);
    let layers = student.decoder("int8", Precision::DEFAULT_INT8).num_layers();
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| student.encode(p)).collect();
    let together = Batch::new(&prompts);
    let empty = together.empty_cache(&fused, layers);
    let (batched, _) = run_fused(&mut fused, &together.ids, &together.mask(0), empty, layers);
    for (b, prompt) in prompts.iter().enumerate() {
        let alone = Batch::new(std::slice::from_ref(prompt));
        let empty = alone.empty_cache(&fused, layers);
        let (single, _) = run_fused(&mut fused, &alone.ids, &alone.mask(0), empty, layers);
        for i in 0..prompt.len() {
            let diff = max_abs_diff(
                &batched.slice(s![b, i, ..]).to_vec(),
                &single.slice(s![0, i, ..]).to_vec(),
            );
            assert!(diff <= 1e-5, "row {b} position {i}: {diff}");
        }
    }
}

/// The GPU form of `student` at `precision`, through `prefill_rows` and a [`SlotCache`] as the
/// scheduler runs it, against the FP32 with-past reference: every row's prefill and step
/// logits at cosine `min_cosine` or closer.
fn gpu_form_follows_the_fp32_graph(precision: Precision, min_cosine: f32) {
    let student = student(Family::Qwen2, 13, |_| {});
    let mut with_past = student.decoder("with-past", Precision::Fp32);
    let dir = student.dir.path().join(format!("gpu-{precision:?}"));
    export::export_form(&student.checkpoint, &dir, precision, ExternalData::Never, Form::GPU).unwrap();
    let mut gpu = DecoderSession::open(&dir.join(export::MODEL_FILE), SessionOptions::default()).unwrap();
    assert!(gpu.fused_attention());
    assert_eq!(gpu.kv_type(), ort::value::TensorElementType::Float16);

    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| student.encode(p)).collect();
    let expected: Vec<_> = prompts.iter().map(|p| reference(&mut with_past, p)).collect();
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let (logits, prefill) = gpu.prefill_rows(&rows).unwrap();
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let mut slots = SlotCache::new(&gpu, rows.len(), longest + STEPS + 1).unwrap();
    for (b, (prefill_logits, _, _)) in expected.iter().enumerate() {
        let c = cosine(&logits.row(b).to_vec(), prefill_logits.last().unwrap());
        assert!(c >= min_cosine, "{precision:?} row {b} prefill: cosine {c}");
        slots.write(b, &prefill, b).unwrap();
    }
    for k in 0..STEPS {
        let tokens: Vec<i64> = expected.iter().map(|(_, _, t)| i64::from(t[k])).collect();
        let logits = slots.step(&mut gpu, &tokens).unwrap();
        for (b, (_, steps, _)) in expected.iter().enumerate() {
            let c = cosine(&logits.row(b).to_vec(), &steps[k]);
            assert!(c >= min_cosine, "{precision:?} row {b} step {k}: cosine {c}");
        }
    }
}

#[test]
fn gpu_form_in_fp16_follows_the_fp32_graph() {
    gpu_form_follows_the_fp32_graph(Precision::Fp32, 0.999);
}

#[test]
fn gpu_form_with_matmul_nbits_int8_weights_follows_the_fp32_graph() {
    gpu_form_follows_the_fp32_graph(Precision::Int8(Int8Format::MatMulNBits), 0.99);
}
