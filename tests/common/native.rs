//! Driving the native decoder engine step by step, as the scheduler does, and comparing it with
//! the ONNX Runtime engine.

use std::path::Path;

use distill_serve::checkpoint::Family;
use distill_serve::engine::cuda::{Backend, NativeDecoder, StepRows, WeightFormat};
use distill_serve::export::Precision;
use distill_serve::generate::argmax;
use distill_serve::reference::cosine;
use distill_serve::tiny::ShapePreset;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Runs `prompt` into `slot` from position 0 in one step; the logits of every position.
pub fn prompt_logits<B: Backend>(engine: &mut NativeDecoder<B>, slot: u32, prompt: &[u32]) -> Vec<Vec<f32>> {
    let rows = StepRows {
        tokens: prompt.to_vec(),
        slots: vec![slot; prompt.len()],
        positions: (0..prompt.len() as u32).collect(),
    };
    let all: Vec<u32> = (0..prompt.len() as u32).collect();
    engine.step(&rows, &all).unwrap()
}

/// Greedy continuation of `prompt` by `n` tokens in slot 0, one sequence alone; with the logits
/// each token was chosen from.
pub fn greedy_alone<B: Backend>(engine: &mut NativeDecoder<B>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut logits = vec![prompt_logits(engine, 0, prompt).pop().unwrap()];
    let mut tokens = vec![argmax(&logits[0])];
    while tokens.len() < n {
        let position = (prompt.len() + tokens.len() - 1) as u32;
        let rows = StepRows {
            tokens: vec![*tokens.last().unwrap()],
            slots: vec![0],
            positions: vec![position],
        };
        let next = engine.step(&rows, &[0]).unwrap().remove(0);
        tokens.push(argmax(&next));
        logits.push(next);
    }
    (tokens, logits)
}

/// The native engine on `backend()` against the ONNX Runtime CPU engine on the same checkpoint
/// (a qwen2 student of `shape`): with FP16 weights its logits are within cosine 0.999 of the FP32
/// export's at every prompt position. Then on the student moved onto the INT8 grid (where both
/// engines hold the very same weights), its greedy tokens with INT8 weights are the export's for
/// `steps`. ONNX Runtime's own INT8 export also quantises activations per token, a different
/// function whose greedy path parts from any other's on a random student.
pub fn assert_matches_onnx_runtime<B: Backend>(backend: impl Fn() -> B, shape: ShapePreset, steps: usize) {
    let st = super::student(Family::Qwen2, 9, |s| {
        s.shape = shape;
        s.init_std = Some(0.3);
    });
    let prompt = st.encode(super::PROMPTS[0]);
    let mut fp32 = st.decoder("fp32", Precision::Fp32);
    let want = super::decoder_batch_logits(&mut fp32, std::slice::from_ref(&prompt), super::Padding::Right).remove(0);
    let mut engine = NativeDecoder::load(&st.checkpoint, backend(), WeightFormat::Fp16, 1, 128).unwrap();
    for (position, (got, want)) in prompt_logits(&mut engine, 0, &prompt).iter().zip(&want).enumerate() {
        let similarity = cosine(got, want);
        assert!(
            similarity >= 0.999,
            "{shape:?} FP16 position {position}: cosine {similarity}"
        );
    }
    round_to_int8_grid(&st.checkpoint);
    let mut on_grid = st.decoder("grid-fp32", Precision::Fp32);
    let want = super::ort_greedy(&mut on_grid, &prompt, steps);
    let mut engine = NativeDecoder::load(&st.checkpoint, backend(), WeightFormat::Int8, 1, 128).unwrap();
    let (got, _) = greedy_alone(&mut engine, &prompt, steps);
    assert_eq!(got, want, "{shape:?} INT8 greedy tokens");
}

/// Moves every matrix of the F32 checkpoint in `dir` onto the grid both native weight formats
/// store exactly: each row `q * 2^k` with integers `q` in [-127, 127] and its largest entry at
/// 127 * 2^k, so quantising at load (scale = max / 127 = 2^k) and FP16 lose nothing.
pub fn round_to_int8_grid(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in file.tensors() {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let mut values: Vec<f32> = view
                .data()
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            if let [_, width] = view.shape() {
                values.chunks_mut(*width).for_each(round_row);
            }
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((name, view.shape().to_vec(), data));
        }
        let views = tensors
            .iter()
            .map(|(name, shape, data)| (name.as_str(), TensorView::new(Dtype::F32, shape.clone(), data).unwrap()));
        safetensors::serialize_to_file(views, None, &path).unwrap();
    }
}

fn round_row(row: &mut [f32]) {
    let Some(largest) = (0..row.len()).max_by(|&a, &b| row[a].abs().total_cmp(&row[b].abs())) else {
        return;
    };
    let max = row[largest].abs();
    if max == 0.0 {
        return;
    }
    let step = (max / 127.0).log2().ceil().exp2();
    for w in row.iter_mut() {
        *w = (*w / step).round().clamp(-127.0, 127.0) * step;
    }
    row[largest] = 127.0 * step * row[largest].signum();
}
