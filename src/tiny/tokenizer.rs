//! Tokenizers trained with the `tokenizers` crate on the corpus the repository ships: byte-level
//! BPE with the special tokens and chat template of a ChatML (Qwen-style) student or with BERT's
//! specials, and a SentencePiece-style unigram model with XLM-RoBERTa's specials.

use std::path::Path;

use anyhow::{Result, anyhow};
use serde_json::json;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::TransformersFormat;
use crate::checkpoint::Family;

/// Text the tiny tokenizers are trained on.
const CORPUS: &str = include_str!("corpus.txt");

/// Special tokens of decoder students, in id order.
const DECODER_SPECIALS: [&str; 5] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"];
/// Special tokens of encoder students, in id order.
const ENCODER_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Id of `<|endoftext|>` in decoder tokenizers (also the padding token).
pub const ENDOFTEXT_ID: u32 = 0;
/// Id of `<|im_end|>` in decoder tokenizers (the end of an assistant turn).
pub const IM_END_ID: u32 = 2;
/// Id of `[PAD]` in encoder tokenizers.
pub const BERT_PAD_ID: u32 = 0;
/// Special tokens of XLM-RoBERTa students, in id order (as `xlm-roberta-base` numbers them).
const XLM_ROBERTA_SPECIALS: [&str; 5] = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"];
/// Id of `<pad>` in XLM-RoBERTa tokenizers.
pub const XLM_ROBERTA_PAD_ID: u32 = 1;

/// The ChatML template, as Qwen2 students carry it.
pub const CHAT_TEMPLATE: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}\
{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// A trained tokenizer with the settings written beside it.
pub struct TinyTokenizer {
    /// The tokenizer itself.
    pub tokenizer: Tokenizer,
    /// Its vocabulary size, special tokens included.
    pub vocab_size: usize,
    family: Family,
}

/// Trains a byte-level BPE tokenizer of about `vocab_size` tokens on `corpus` (the shipped
/// corpus when `None`).
pub fn train_tokenizer(family: Family, vocab_size: usize, corpus: Option<&str>) -> Result<TinyTokenizer> {
    if family == Family::XlmRoberta {
        return train_unigram(vocab_size, corpus);
    }
    let specials: &[&str] = if family == Family::Bert {
        &ENCODER_SPECIALS
    } else {
        &DECODER_SPECIALS
    };
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.iter().map(|t| AddedToken::from(*t, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    // No prefix space, as Qwen2 and Llama 3 tokenizers: decoding must give back the exact text.
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer
        .train(&mut trainer, corpus.unwrap_or(CORPUS).lines())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    if family == Family::Bert {
        let post = TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
            .map_err(|e| anyhow!("tokenizer template: {e}"))?
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build()
            .map_err(|e| anyhow!("tokenizer template: {e}"))?;
        tokenizer.with_post_processor(Some(post));
    } else {
        tokenizer.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    }
    let vocab_size = tokenizer.get_vocab_size(true);
    Ok(TinyTokenizer {
        tokenizer,
        vocab_size,
        family,
    })
}

/// A unigram model over metaspace-split words (`▁` marks a word start), as XLM-RoBERTa's
/// SentencePiece tokenizer: pieces of Chinese and English, `<unk>` for characters the corpus
/// lacks, `<s> A </s>` and `<s> A </s></s> B </s>` around inputs, every type id 0.
fn train_unigram(vocab_size: usize, corpus: Option<&str>) -> Result<TinyTokenizer> {
    let mut trainer: TrainerWrapper = UnigramTrainerBuilder::default()
        .vocab_size(vocab_size as u32)
        .show_progress(false)
        .special_tokens(
            XLM_ROBERTA_SPECIALS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .unk_token(Some("<unk>".into()))
        // Short pieces, as a large SentencePiece vocabulary has for Chinese: long ones learnt
        // from a small corpus would run across word (and entity) boundaries in unspaced text.
        .max_piece_length(4)
        .build()
        .map_err(|e| anyhow!("unigram trainer: {e}"))?
        .into();
    let mut tokenizer = Tokenizer::new(Unigram::default());
    let metaspace = Metaspace::new('▁', PrependScheme::Always, true);
    tokenizer.with_pre_tokenizer(Some(metaspace.clone()));
    tokenizer.with_decoder(Some(metaspace));
    tokenizer
        .train(&mut trainer, corpus.unwrap_or(CORPUS).lines())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let post = TemplateProcessing::builder()
        .try_single("<s> $A </s>")
        .and_then(|b| b.try_pair("<s> $A </s> </s> $B </s>"))
        .map_err(|e| anyhow!("tokenizer template: {e}"))?
        .special_tokens(vec![("<s>", 0), ("</s>", 2)])
        .build()
        .map_err(|e| anyhow!("tokenizer template: {e}"))?;
    tokenizer.with_post_processor(Some(post));
    let vocab_size = tokenizer.get_vocab_size(true);
    Ok(TinyTokenizer {
        tokenizer,
        vocab_size,
        family: Family::XlmRoberta,
    })
}

impl TinyTokenizer {
    /// Writes `tokenizer.json`, `tokenizer_config.json` and, in the 5.x layout,
    /// `chat_template.jinja`.
    pub fn write(&self, out: &Path, format: TransformersFormat) -> Result<()> {
        self.tokenizer
            .save(out.join("tokenizer.json"), true)
            .map_err(|e| anyhow!("writing tokenizer.json: {e}"))?;
        let mut config = match self.family {
            Family::XlmRoberta => json!({
                "tokenizer_class": "XLMRobertaTokenizer",
                "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>",
                "model_max_length": 512,
            }),
            Family::Bert => json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                "sep_token": "[SEP]", "mask_token": "[MASK]",
                "model_max_length": 512,
            }),
            _ => json!({
                "tokenizer_class": "Qwen2Tokenizer",
                "bos_token": null,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 2048,
            }),
        };
        if !self.family.is_encoder() {
            match format {
                TransformersFormat::V4 => config["chat_template"] = json!(CHAT_TEMPLATE),
                TransformersFormat::V5 => std::fs::write(out.join("chat_template.jinja"), CHAT_TEMPLATE)?,
            }
        }
        std::fs::write(
            out.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_tokenizer_round_trips_and_keeps_special_ids() {
        let tok = train_tokenizer(Family::Qwen2, 400, None).unwrap();
        assert!(tok.vocab_size > 256 && tok.vocab_size <= 400, "{}", tok.vocab_size);
        let text = "<|im_start|>user\nCode for E11.9? Ünïcödé ✓<|im_end|>";
        let enc = tok.tokenizer.encode(text, false).unwrap();
        assert_eq!(enc.get_ids()[0], 1);
        assert_eq!(*enc.get_ids().last().unwrap(), IM_END_ID);
        assert_eq!(tok.tokenizer.decode(enc.get_ids(), false).unwrap(), text);
        assert_eq!(tok.tokenizer.token_to_id("<|endoftext|>"), Some(ENDOFTEXT_ID));
    }

    #[test]
    fn training_is_deterministic() {
        let a = train_tokenizer(Family::Llama, 500, None)
            .unwrap()
            .tokenizer
            .to_string(false)
            .unwrap();
        let b = train_tokenizer(Family::Llama, 500, None)
            .unwrap()
            .tokenizer
            .to_string(false)
            .unwrap();
        assert_eq!(a, b);
    }
}
