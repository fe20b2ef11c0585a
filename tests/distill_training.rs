//! The trainable decoder and the KD training loop on tiny students: same logits as the
//! `candle-transformers` reference, a gradient for every tensor, and a loss that falls.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use common::{PROMPTS, student};
use distill_serve::checkpoint::{Checkpoint, Family};
use distill_serve::distill::loss::LossWeights;
use distill_serve::distill::model::TrainableDecoder;
use distill_serve::distill::trainer::{Example, TrainConfig, loss_and_gradients, train};
use distill_serve::reference::ReferenceDecoder;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn training_forward_matches_the_reference_on_a_right_padded_batch() {
    for family in [Family::Qwen2, Family::Llama] {
        let s = student(family, 3, |_| {});
        let model = TrainableDecoder::load(&s.checkpoint).unwrap();
        let mut reference = ReferenceDecoder::load(&s.checkpoint).unwrap();
        let seqs: Vec<Vec<u32>> = PROMPTS[..2].iter().map(|p| s.encode(p)).collect();
        let len = seqs.iter().map(Vec::len).max().unwrap();
        let ids: Vec<u32> = seqs
            .iter()
            .flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, len - s.len())))
            .collect();
        let input = Tensor::from_vec(ids, (seqs.len(), len), &Device::Cpu).unwrap();
        let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let logits = model.forward(&input, &lengths).unwrap().to_vec3::<f32>().unwrap();
        for (b, seq) in seqs.iter().enumerate() {
            let expected = reference.logits(seq).unwrap();
            for (pos, row) in expected.iter().enumerate() {
                let d = max_diff(&logits[b][pos], row);
                assert!(d < 1e-4, "{family:?} row {b} position {pos}: max diff {d}");
            }
        }
    }
}

/// A prompt + completion example with made-up teacher top-3 at every completion position.
fn example(s: &common::Student, prompt: &str, completion: &str) -> Example {
    let mut tokens = s.encode(prompt);
    let completion_start = tokens.len();
    tokens.extend(s.encode(completion));
    let top = tokens[completion_start..]
        .iter()
        .map(|&t| vec![(t, -0.4f32), ((t + 1) % 500, -1.6), ((t + 7) % 500, -2.5)])
        .collect();
    Example {
        tokens,
        completion_start,
        top: Some(top),
    }
}

#[test]
fn every_trainable_tensor_receives_a_non_zero_gradient() {
    for (family, fake_quant) in [(Family::Qwen2, false), (Family::Llama, true)] {
        let s = student(family, 4, |spec| {
            spec.tie_word_embeddings = Some(family == Family::Qwen2)
        });
        let mut model = TrainableDecoder::load(&s.checkpoint).unwrap();
        model.fake_quant = fake_quant;
        let a = example(&s, PROMPTS[0], " E11.9");
        let b = example(&s, PROMPTS[1], " diabetes");
        let weights = LossWeights {
            alpha: 0.5,
            entropy: 0.1,
        };
        let (loss, grads) = loss_and_gradients(&model, &[&a, &b], 2.0, weights).unwrap();
        assert!(loss.kl.is_some() && loss.total.is_finite());
        let mut checked = 0;
        for (name, var) in model.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{family:?}: {name} has no gradient"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{family:?}: {name} has a zero gradient");
            checked += 1;
        }
        let ckpt = Checkpoint::open(&s.checkpoint).unwrap();
        let expected = distill_serve::checkpoint::tensor_specs(&ckpt.config).len();
        assert_eq!(checked, expected);
    }
}

#[test]
fn training_lowers_the_loss_and_saves_a_loadable_checkpoint() {
    let s = student(Family::Qwen2, 5, |_| {});
    let mut model = TrainableDecoder::load(&s.checkpoint).unwrap();
    let examples = vec![
        example(&s, PROMPTS[0], " E11.9"),
        example(&s, PROMPTS[1], " E11.9"),
        example(&s, PROMPTS[2], " E11.9"),
    ];
    let config = TrainConfig {
        steps: 30,
        batch_size: 3,
        learning_rate: 3e-3,
        warmup_steps: 3,
        tau_start: 1.0,
        ..TrainConfig::default()
    };
    let mut losses = Vec::new();
    train(&mut model, &examples, &config, &AtomicBool::new(false), None, |r| {
        losses.push(r.loss.total)
    })
    .unwrap();
    assert_eq!(losses.len(), 30);
    let (first, last) = (losses[0], losses[29]);
    assert!(last < first * 0.5, "loss {first} -> {last}");

    let out = s.dir.path().join("trained");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(s.checkpoint.join(f), out.join(f)).unwrap();
    }
    model.save(&out).unwrap();
    let reloaded = TrainableDecoder::load(&out).unwrap();
    let input = Tensor::new(examples[0].tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let len = [examples[0].tokens.len()];
    let logits = |m: &TrainableDecoder| {
        let t = m.forward(&input, &len).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b) = (logits(&model), logits(&reloaded));
    assert_eq!(a, b);

    let cancelled = train(&mut model, &examples, &config, &AtomicBool::new(true), None, |_| {});
    assert_eq!(cancelled.unwrap_err().to_string(), "cancelled");
}
