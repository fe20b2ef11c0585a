//! White-box distillation from a local teacher: when a refresh job names a model of the
//! repository whose training checkpoint it can read (same family and vocabulary, any size),
//! the student's last layers learn the teacher's last layers — their outputs (through a learned
//! linear projection when the widths differ) and their attention maps (averaged over heads) —
//! beside the usual KL / cross-entropy terms. The teacher runs on the same trainer, no gradient.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::model::{Trace, TrainableDecoder, matmul_rows};
use crate::checkpoint::{DecoderConfig, ModelConfig};

/// The `white_box` object of a refresh job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhiteBoxSpec {
    /// A model of the repository whose serving version's training checkpoint teaches.
    pub teacher_model: String,
    /// Weight of the hidden-state term (mean squared error).
    #[serde(default = "one")]
    pub hidden_weight: f64,
    /// Weight of the attention-map term (mean squared error of probabilities).
    #[serde(default = "one")]
    pub attention_weight: f64,
    /// How many last layers are matched, the student's last with the teacher's last (where
    /// `layer_map` is not given).
    #[serde(default = "three")]
    pub layers: usize,
    /// Explicit `[student layer, teacher layer]` pairs, 0-based; replaces `layers`.
    #[serde(default)]
    pub layer_map: Option<Vec<[usize; 2]>>,
    /// How attention maps are compared across heads.
    #[serde(default)]
    pub heads: HeadMatching,
}

/// How the attention term pairs heads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadMatching {
    /// Each side's maps averaged over its heads: any head counts.
    #[default]
    Average,
    /// Head by head: each student head with the mean of its group of teacher heads (the
    /// teacher's head count a multiple of the student's).
    Mapped,
}

impl WhiteBoxSpec {
    /// The `(student layer, teacher layer)` pairs for a student of `student` layers and a
    /// teacher of `teacher` layers.
    pub fn pairs(&self, student: usize, teacher: usize) -> Result<Vec<(usize, usize)>> {
        match &self.layer_map {
            Some(map) => {
                if map.is_empty() {
                    bail!("white_box.layer_map is empty");
                }
                if let Some([s, t]) = map.iter().find(|[s, t]| *s >= student || *t >= teacher) {
                    bail!(
                        "white_box.layer_map pair [{s}, {t}] is outside the student's {student} or the teacher's {teacher} layers (0-based)"
                    );
                }
                Ok(map.iter().map(|&[s, t]| (s, t)).collect())
            }
            None => {
                let n = self.layers;
                if n == 0 || n > student.min(teacher) {
                    bail!(
                        "white_box.layers is {n}; it must be 1..={} (the fewer layers of the two)",
                        student.min(teacher)
                    );
                }
                Ok((0..n).map(|i| (student - n + i, teacher - n + i)).collect())
            }
        }
    }
}

fn one() -> f64 {
    1.0
}
fn three() -> usize {
    3
}

fn decoder_config(dir: &Path) -> Result<DecoderConfig> {
    let text = std::fs::read_to_string(dir.join("config.json"))
        .with_context(|| format!("{} holds no training checkpoint (config.json)", dir.display()))?;
    match ModelConfig::from_json(&text)? {
        ModelConfig::Decoder(c) => Ok(c),
        ModelConfig::Encoder(_) => bail!("{} is an encoder", dir.display()),
    }
}

/// Checks that the checkpoint in `teacher` can teach the one in `student` white-box as `spec`
/// says: one family, one vocabulary, layers that both have, heads that map.
pub fn check_pair(student: &Path, teacher: &Path, spec: &WhiteBoxSpec) -> Result<()> {
    let (s, t) = (decoder_config(student)?, decoder_config(teacher)?);
    if s.family != t.family {
        bail!(
            "the white-box teacher is a {} model and the student a {} one: white-box distillation needs one family",
            t.family.model_type(),
            s.family.model_type()
        );
    }
    if s.vocab_size != t.vocab_size {
        bail!(
            "the white-box teacher's vocabulary has {} tokens, the student's {}: they must share one",
            t.vocab_size,
            s.vocab_size
        );
    }
    spec.pairs(s.num_layers, t.num_layers)?;
    if spec.heads == HeadMatching::Mapped && t.num_heads % s.num_heads != 0 {
        bail!(
            "white_box.heads is mapped, but the teacher's {} heads are not a multiple of the student's {}",
            t.num_heads,
            s.num_heads
        );
    }
    Ok(())
}

/// A loaded local teacher and the projection of the student's hidden states onto its width.
pub struct WhiteBox {
    teacher: TrainableDecoder,
    /// `[teacher hidden, student hidden]`, where the widths differ.
    projection: Option<Var>,
    /// `(student layer, teacher layer)` pairs compared.
    pairs: Vec<(usize, usize)>,
    pub spec: WhiteBoxSpec,
}

impl WhiteBox {
    /// The teacher in `teacher_dir` for a student of `student` config.
    pub fn load(teacher_dir: &Path, student: &DecoderConfig, spec: WhiteBoxSpec) -> Result<Self> {
        let teacher = TrainableDecoder::load(teacher_dir)?;
        let pairs = spec.pairs(student.num_layers, teacher.config().num_layers)?;
        let (t, s) = (teacher.config().hidden_size, student.hidden_size);
        // Starts as the identity on the shared dimensions: deterministic, and exact where one
        // width holds the other.
        let projection = (t != s)
            .then(|| {
                let eye: Vec<f32> = (0..t * s).map(|i| if i / s == i % s { 1.0 } else { 0.0 }).collect();
                Var::from_tensor(&Tensor::from_vec(eye, (t, s), &Device::Cpu)?)
            })
            .transpose()?;
        Ok(Self {
            teacher,
            projection,
            pairs,
            spec,
        })
    }

    /// The student layers a traced forward must keep, increasing.
    pub fn student_layers(&self) -> Vec<usize> {
        sorted(self.pairs.iter().map(|p| p.0))
    }

    fn teacher_layers(&self) -> Vec<usize> {
        sorted(self.pairs.iter().map(|p| p.1))
    }

    /// Attention maps as the term compares them: `[batch, seq, seq]` averaged, or
    /// `[batch, heads, seq, seq]` with `heads` the student's, each the mean of its group.
    fn heads(&self, probs: &Tensor, heads: usize) -> Result<Tensor> {
        Ok(match self.spec.heads {
            HeadMatching::Average => probs.mean(1)?,
            HeadMatching::Mapped => {
                let (batch, n, seq, _) = probs.dims4()?;
                probs.reshape((batch, heads, n / heads, seq, seq))?.mean(2)?
            }
        })
    }

    /// The trainable projection, if any.
    pub fn vars(&self) -> Vec<Var> {
        self.projection.iter().cloned().collect()
    }

    /// (hidden-state, attention-map) losses of the student's `trace` against the teacher on
    /// the same right-padded batch, over real positions only.
    pub fn losses(&self, student: &Trace, input_ids: &Tensor, lengths: &[usize]) -> Result<(Tensor, Tensor)> {
        let (student_layers, teacher_layers) = (self.student_layers(), self.teacher_layers());
        let (_, teacher) = self.teacher.hidden_traced(input_ids, lengths, &teacher_layers)?;
        let (batch, seq) = input_ids.dims2()?;
        let real: Vec<f32> = lengths
            .iter()
            .flat_map(|&len| (0..seq).map(move |i| if i < len { 1.0 } else { 0.0 }))
            .collect();
        let real = Tensor::from_vec(real, (batch, seq), input_ids.device())?;
        let tokens = real.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
        let pairs = real.unsqueeze(2)?.broadcast_mul(&real.unsqueeze(1)?)?;
        let n_pairs = pairs.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
        let (mut hidden, mut attention) = (
            Tensor::zeros((), DType::F32, &Device::Cpu)?,
            Tensor::zeros((), DType::F32, &Device::Cpu)?,
        );
        let at = |layers: &[usize], layer: usize| layers.binary_search(&layer).unwrap_or_default();
        for &(s_layer, t_layer) in &self.pairs {
            let (si, ti) = (at(&student_layers, s_layer), at(&teacher_layers, t_layer));
            let (s, t) = (&student.hidden[si], &teacher.hidden[ti]);
            let s = match &self.projection {
                Some(p) => matmul_rows(s, p.as_tensor())?,
                None => s.clone(),
            };
            hidden = (hidden + hidden_distance(&s, &t.detach(), &real, tokens)?)?;

            let heads = student.attentions[si].dim(1)?;
            let s = self.heads(&student.attentions[si], heads)?;
            let t = self.heads(&teacher.attentions[ti].detach(), heads)?;
            let err = (s - t)?.sqr()?;
            // Averaged maps are [batch, seq, seq]; mapped ones have a head axis to cover.
            let (mask, maps) = match self.spec.heads {
                HeadMatching::Average => (pairs.clone(), 1.0),
                HeadMatching::Mapped => (pairs.unsqueeze(1)?, heads as f64),
            };
            attention = (attention + (err.broadcast_mul(&mask)?.sum_all()? / (n_pairs * maps))?)?;
        }
        let n = self.pairs.len() as f64;
        Ok(((hidden / n)?, (attention / n)?))
    }
}

/// Mean squared error of the two sides' hidden states at the `real` positions (`tokens` of
/// them), each position's vector scaled to unit RMS first: residual streams grow large (a
/// trained student's reach hundreds), so the raw error would swamp the KL/CE terms, while
/// scaled it is `2 - 2 cos`, within 0..=4, whatever the models' scales.
fn hidden_distance(student: &Tensor, teacher: &Tensor, real: &Tensor, tokens: f64) -> Result<Tensor> {
    let unit = |x: &Tensor| -> Result<Tensor> {
        let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
        Ok(x.broadcast_div(&rms)?)
    };
    let err = (unit(student)? - unit(teacher)?)?.sqr()?.mean(D::Minus1)?;
    Ok(((err * real)?.sum_all()? / tokens)?)
}

fn sorted(layers: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut v: Vec<usize> = layers.collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Family;
    use crate::tiny::{TinySpec, write_tiny};

    fn checkpoint(dir: &Path, seed: u64, hidden: usize) -> DecoderConfig {
        let mut spec = TinySpec::new(Family::Qwen2, seed);
        spec.hidden_size = Some(hidden);
        spec.init_std = Some(0.3);
        match write_tiny(&spec, dir).unwrap() {
            ModelConfig::Decoder(c) => c,
            ModelConfig::Encoder(_) => unreachable!(),
        }
    }

    fn spec(layers: usize) -> WhiteBoxSpec {
        WhiteBoxSpec {
            teacher_model: "t".into(),
            hidden_weight: 1.0,
            attention_weight: 1.0,
            layers,
            layer_map: None,
            heads: HeadMatching::Average,
        }
    }

    fn batch() -> (Tensor, Vec<usize>) {
        let ids = Tensor::new(&[[5u32, 9, 17, 3, 0], [7, 11, 2, 0, 0]], &Device::Cpu).unwrap();
        (ids, vec![4, 3])
    }

    #[test]
    fn the_hidden_term_is_a_distance_of_directions_not_of_scales() {
        let s = Tensor::new(&[[[1f32, -2.0, 3.0, 0.5], [0.0, 1.0, 0.0, 0.0]]], &Device::Cpu).unwrap();
        let real = Tensor::new(&[[1f32, 1.0]], &Device::Cpu).unwrap();
        let d = |t: &Tensor| hidden_distance(&s, t, &real, 2.0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d(&s).abs() < 1e-5);
        assert!(
            d(&(&s * 300.0).unwrap()).abs() < 1e-5,
            "a larger teacher scale costs nothing"
        );
        assert!((d(&s.neg().unwrap()) - 4.0).abs() < 1e-4, "opposite directions cost 4");
        let padded = Tensor::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
        let other = Tensor::new(&[[[1f32, -2.0, 3.0, 0.5], [5.0, 0.0, 0.0, 0.0]]], &Device::Cpu).unwrap();
        assert!(
            hidden_distance(&s, &other, &padded, 1.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .abs()
                < 1e-5
        );
    }

    #[test]
    fn a_teacher_identical_to_the_student_costs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = checkpoint(dir.path(), 4, 64);
        let student = TrainableDecoder::load(dir.path()).unwrap();
        let white_box = WhiteBox::load(dir.path(), &config, spec(2)).unwrap();
        assert!(white_box.vars().is_empty(), "equal widths need no projection");
        let (ids, lengths) = batch();
        let (_, trace) = student
            .hidden_traced(&ids, &lengths, &white_box.student_layers())
            .unwrap();
        let (h, a) = white_box.losses(&trace, &ids, &lengths).unwrap();
        assert_eq!(h.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(a.to_scalar::<f32>().unwrap(), 0.0);
        let mapped = WhiteBoxSpec {
            heads: HeadMatching::Mapped,
            layer_map: Some(vec![[0, 0], [1, 1]]),
            ..spec(2)
        };
        let white_box = WhiteBox::load(dir.path(), &config, mapped).unwrap();
        let (_, trace) = student
            .hidden_traced(&ids, &lengths, &white_box.student_layers())
            .unwrap();
        let (h, a) = white_box.losses(&trace, &ids, &lengths).unwrap();
        assert_eq!(
            (h.to_scalar::<f32>().unwrap(), a.to_scalar::<f32>().unwrap()),
            (0.0, 0.0)
        );
    }

    #[test]
    fn a_layer_map_of_the_last_layers_is_the_default_and_bad_maps_are_refused() {
        let (s_dir, t_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let config = checkpoint(s_dir.path(), 4, 64);
        checkpoint(t_dir.path(), 9, 96);
        let student = TrainableDecoder::load(s_dir.path()).unwrap();
        let (ids, lengths) = batch();
        let losses = |spec: WhiteBoxSpec| {
            let white_box = WhiteBox::load(t_dir.path(), &config, spec).unwrap();
            let (_, trace) = student
                .hidden_traced(&ids, &lengths, &white_box.student_layers())
                .unwrap();
            let (h, a) = white_box.losses(&trace, &ids, &lengths).unwrap();
            (h.to_scalar::<f32>().unwrap(), a.to_scalar::<f32>().unwrap())
        };
        let last_two = losses(spec(2));
        // Listed out of order: the pairs, not their order, decide.
        let map = |pairs: Vec<[usize; 2]>| WhiteBoxSpec {
            layer_map: Some(pairs),
            ..spec(2)
        };
        assert_eq!(losses(map(vec![[1, 1], [0, 0]])), last_two);
        let crossed = losses(map(vec![[1, 0], [0, 1]]));
        assert_ne!(crossed, last_two);
        let mapped = losses(WhiteBoxSpec {
            heads: HeadMatching::Mapped,
            ..spec(2)
        });
        assert_eq!(mapped.0, last_two.0, "head matching leaves the hidden term alone");
        assert_ne!(mapped.1, last_two.1);
        let refused = |spec: WhiteBoxSpec| check_pair(s_dir.path(), t_dir.path(), &spec).unwrap_err().to_string();
        assert!(refused(map(vec![[2, 0]])).contains("outside the student's 2"));
        assert!(refused(map(vec![])).contains("empty"));
    }

    #[test]
    fn a_wider_teacher_trains_the_projection_and_the_student() {
        let (s_dir, t_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let config = checkpoint(s_dir.path(), 4, 64);
        checkpoint(t_dir.path(), 9, 96);
        check_pair(s_dir.path(), t_dir.path(), &spec(2)).unwrap();
        let student = TrainableDecoder::load(s_dir.path()).unwrap();
        let white_box = WhiteBox::load(t_dir.path(), &config, spec(2)).unwrap();
        let (ids, lengths) = batch();
        let (_, trace) = student.hidden_traced(&ids, &lengths, &[0, 1]).unwrap();
        let (h, a) = white_box.losses(&trace, &ids, &lengths).unwrap();
        assert!(h.to_scalar::<f32>().unwrap() > 0.0 && a.to_scalar::<f32>().unwrap() > 0.0);
        let grads = (h + a).unwrap().backward().unwrap();
        let norm = |v: &Var| {
            grads
                .get(v.as_tensor())
                .map_or(0.0, |g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
        };
        for v in white_box.vars() {
            assert!(norm(&v) > 0.0, "the projection gets no gradient");
        }
        let q = student
            .vars()
            .find(|(n, _)| n.ends_with("layers.1.self_attn.q_proj.weight"))
            .unwrap()
            .1;
        assert!(norm(q) > 0.0, "the attention term reaches the student's queries");
        assert!(
            check_pair(s_dir.path(), t_dir.path(), &spec(3))
                .unwrap_err()
                .to_string()
                .contains("white_box.layers")
        );
    }
}
