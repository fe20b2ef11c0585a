//! Recipes that build the project's own students from public data: the ICD-10-CM coding
//! dataset behind the embedded default student (`models/recipe-icd10cm.sh` runs the rest), and
//! the encoder students' datasets (`models/recipe-encoders.sh`).

pub mod augment;
pub mod dataset;
pub mod encoders;

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::constrain::load_icd10cm_xml;
use dataset::{DatasetSpec, Pair, build, corpus};

/// Writes `train.jsonl`, `heldout.jsonl` (prompts with their codes as labels) and `corpus.txt`
/// (tokenizer text) for the ICD-10-CM tabular XML at `xml` into `out`; returns a summary.
pub fn write_icd10cm_dataset(xml: &Path, spec: &DatasetSpec, out: &Path) -> Result<Value> {
    let terminology = load_icd10cm_xml(xml)?;
    let mut d = build(&terminology, spec);
    let (augmented, report) = augment::augment(&terminology, &d, spec.augment_per_code, spec.seed);
    d.train.extend(augmented);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let write_jsonl = |name: &str, pairs: &[Pair]| -> Result<()> {
        let path = out.join(name);
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        for p in pairs {
            writeln!(f, "{}", serde_json::to_string(&p.prompt())?)?;
        }
        Ok(f.flush()?)
    };
    write_jsonl("train.jsonl", &d.train)?;
    write_jsonl("heldout.jsonl", &d.held_out)?;
    std::fs::write(out.join("corpus.txt"), corpus(&d))?;
    Ok(
        json!({"codes": d.codes.len(), "train": d.train.len(), "held_out": d.held_out.len(),
        "augmented": report, "out": out}),
    )
}

/// Writes an encoder dataset into `out`: `train.jsonl`, `heldout.jsonl` (and
/// `heldout-new-phrasing.jsonl` where it has one; labelled texts),
/// `labels.txt` (the labels, comma-separated, for `tiny --labels`) and `corpus.txt` (the
/// training texts, for the tokenizer); returns a summary.
pub fn write_encoder_dataset(d: &encoders::EncoderDataset, out: &Path) -> Result<Value> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let files = [
        ("train.jsonl", &d.train),
        ("heldout.jsonl", &d.held_out),
        ("heldout-new-phrasing.jsonl", &d.held_out_new_phrasing),
    ];
    for (name, texts) in files.into_iter().filter(|(_, t)| !t.is_empty()) {
        let path = out.join(name);
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        for t in texts {
            writeln!(f, "{}", serde_json::to_string(t)?)?;
        }
        f.flush()?;
    }
    std::fs::write(out.join("labels.txt"), d.labels.join(","))?;
    std::fs::write(out.join("corpus.txt"), d.corpus())?;
    Ok(json!({"labels": d.labels.len(), "train": d.train.len(), "held_out": d.held_out.len(), "out": out}))
}
