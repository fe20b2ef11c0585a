//! Helpers shared by the integration tests: tiny students in temporary folders, exports, and
//! padded batches run through ONNX Runtime.
#![allow(dead_code)]

#[cfg(feature = "cuda-native")]
pub mod fake_gpu;
pub mod launch;
pub mod native;
pub mod server;

use std::path::{Path, PathBuf};

use distill_serve::checkpoint::Family;
use distill_serve::engine::{DecoderSession, EncoderSession, SessionOptions};
use distill_serve::export::{self, ExternalData, Precision};
use distill_serve::tiny::{TinySpec, write_tiny};
use ndarray::Array2;
use tempfile::TempDir;

/// A tiny student written to a fresh temporary folder.
pub struct Student {
    pub dir: TempDir,
    pub checkpoint: PathBuf,
}

/// Writes a tiny student of `family`, letting `tweak` adjust the spec first.
pub fn student(family: Family, seed: u64, tweak: impl FnOnce(&mut TinySpec)) -> Student {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    let mut spec = TinySpec::new(family, seed);
    tweak(&mut spec);
    write_tiny(&spec, &checkpoint).unwrap();
    Student { dir, checkpoint }
}

impl Student {
    /// Exports into `<tmp>/<label>` and returns the model path.
    pub fn export(&self, label: &str, precision: Precision, external: ExternalData) -> PathBuf {
        let out = self.dir.path().join(label);
        export::export(&self.checkpoint, &out, precision, external).unwrap();
        out.join(export::MODEL_FILE)
    }

    pub fn decoder(&self, label: &str, precision: Precision) -> DecoderSession {
        DecoderSession::open(
            &self.export(label, precision, ExternalData::Never),
            SessionOptions::default(),
        )
        .unwrap()
    }

    pub fn encoder(&self, label: &str, precision: Precision) -> EncoderSession {
        EncoderSession::open(
            &self.export(label, precision, ExternalData::Never),
            SessionOptions::default(),
        )
        .unwrap()
    }

    /// Token ids of `text` under the student's own tokenizer.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let tok = tokenizers::Tokenizer::from_file(self.checkpoint.join("tokenizer.json")).unwrap();
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }
}

/// Prompts of different lengths for padded batches.
pub const PROMPTS: [&str; 3] = [
    "The patient has type 2 diabetes mellitus without complications.",
    "Code: E11.9",
    "The market opened higher on Monday as bond yields fell and technology shares rallied.",
];

/// Which side padding goes on.
#[derive(Clone, Copy, Debug)]
pub enum Padding {
    Left,
    Right,
}

/// A padded batch: ids, attention mask, position ids (counting real tokens only).
pub fn pad(seqs: &[Vec<u32>], padding: Padding, pad_id: u32) -> (Array2<i64>, Array2<i64>, Array2<i64>) {
    let len = seqs.iter().map(Vec::len).max().unwrap();
    let mut ids = Array2::from_elem((seqs.len(), len), i64::from(pad_id));
    let mut mask = Array2::zeros((seqs.len(), len));
    let mut pos = Array2::zeros((seqs.len(), len));
    for (b, s) in seqs.iter().enumerate() {
        let start = match padding {
            Padding::Left => len - s.len(),
            Padding::Right => 0,
        };
        for (i, &t) in s.iter().enumerate() {
            ids[[b, start + i]] = i64::from(t);
            mask[[b, start + i]] = 1;
            pos[[b, start + i]] = i as i64;
        }
    }
    (ids, mask, pos)
}

/// Logits of the real (unpadded) positions of each sequence, from one padded ORT batch.
pub fn decoder_batch_logits(session: &mut DecoderSession, seqs: &[Vec<u32>], padding: Padding) -> Vec<Vec<Vec<f32>>> {
    let (ids, mask, pos) = pad(seqs, padding, 0);
    let cache = session.empty_cache(seqs.len()).unwrap();
    let (logits, _) = session.forward(&ids, &mask, &pos, cache).unwrap();
    let len = ids.ncols();
    seqs.iter()
        .enumerate()
        .map(|(b, s)| {
            let start = match padding {
                Padding::Left => len - s.len(),
                Padding::Right => 0,
            };
            (start..start + s.len())
                .map(|i| logits.slice(ndarray::s![b, i, ..]).to_vec())
                .collect()
        })
        .collect()
}

/// Greedy continuation with the ORT session and its KV cache.
pub fn ort_greedy(session: &mut DecoderSession, prompt: &[u32], n: usize) -> Vec<u32> {
    distill_serve::generate::greedy(session, prompt, n, &[]).unwrap()
}

/// The billable codes of an ICD-10-CM tabular XML file.
pub fn billable_codes(xml: &Path) -> std::collections::BTreeSet<String> {
    distill_serve::constrain::load_icd10cm_xml(xml)
        .unwrap()
        .entries
        .into_iter()
        .filter(|e| e.billable)
        .map(|e| e.code)
        .collect()
}

/// `path` inside the repository checkout.
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The path of the built `distill-serve` binary.
pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_distill-serve"))
}

/// A free port on the loopback interface, as `127.0.0.1:PORT`, for a process the test starts.
pub fn free_loopback_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// `models/<script>` at toy scale on the small ICD-10-CM fixture, writing its student to `out`
/// and its intermediate files to `work`, with the built binary; add the script's own variables.
pub fn toy_recipe(script: &str, out: &Path, work: &Path) -> std::process::Command {
    let mut command = std::process::Command::new("bash");
    command
        .arg(repo_file("models").join(script))
        .env("SCALE", "toy")
        .env(
            "ICD10CM_XML",
            repo_file("tests/fixtures/terminology/icd10cm_tabular_small.xml"),
        )
        .env("OUT", out)
        .env("WORK", work)
        .env("DISTILL_SERVE_BIN", binary());
    command
}

/// A small deterministic generator for property tests, so a failure names a case that
/// reproduces.
pub struct Lcg(pub u64);

impl Lcg {
    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }

    /// One of `items`.
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}
