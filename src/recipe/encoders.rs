//! Datasets of the project's encoder students, as [`LabelledText`] JSONL: ICD-10-CM chapter
//! classification from the CMS tabular release (whole categories held out, so the held-out
//! phrases name codes the student never saw), and zh/en financial entities (companies, amounts,
//! dates) from templates, held out with company names, numbers and one template per language
//! it never trained on.

use std::collections::BTreeSet;

use rand::Rng;
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::constrain::Terminology;
use crate::distill::encoder_train::{EntitySpan, LabelledText};

/// Training and held-out texts with the model's labels (its `id2label`, in order).
#[derive(Debug, Clone, Default)]
pub struct EncoderDataset {
    pub labels: Vec<String>,
    pub train: Vec<LabelledText>,
    pub held_out: Vec<LabelledText>,
    /// A second held-out set, of sentence patterns never trained on (written as
    /// `heldout-new-phrasing.jsonl`), where there is one.
    pub held_out_new_phrasing: Vec<LabelledText>,
    /// Text the tokenizer also learns from: the alphabet the generator draws from, as a real
    /// multilingual tokenizer knows every common character (never held-out sentences).
    pub alphabet: String,
}

impl EncoderDataset {
    /// The training texts, one a line, and the alphabet: what the student's tokenizer is
    /// trained on (never the held-out texts).
    pub fn corpus(&self) -> String {
        let mut out: String = self.train.iter().map(|t| format!("{}\n", t.text)).collect();
        out.push_str(&self.alphabet);
        out
    }
}

/// The chapter (its code range, `I00-I99`) each billable code falls in, as the label of its
/// description and inclusion terms; every `held_out_every`-th category (drawn with `seed`) is
/// held out whole. At most `max_train` / `max_held_out` texts are kept, drawn with `seed`.
pub fn icd10cm_chapters(
    terminology: &Terminology,
    held_out_every: usize,
    max_train: usize,
    max_held_out: usize,
    seed: u64,
) -> EncoderDataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let chapter_of = |code: &str| {
        let category = code.get(..3)?;
        terminology.chapters.iter().find_map(|(_, range)| {
            let (first, last) = range.split_once('-')?;
            (first <= category && category <= last).then(|| range.clone())
        })
    };
    let mut categories: Vec<&str> = terminology
        .entries
        .iter()
        .filter_map(|e| e.code.get(..3))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    categories.shuffle(&mut rng);
    let held: BTreeSet<&str> = categories.iter().step_by(held_out_every.max(2)).copied().collect();
    let mut d = EncoderDataset {
        labels: terminology.chapters.iter().map(|(_, range)| range.clone()).collect(),
        ..EncoderDataset::default()
    };
    for e in terminology.entries.iter().filter(|e| e.billable) {
        let Some(chapter) = chapter_of(&e.code) else {
            continue;
        };
        let held_out = e.code.get(..3).is_some_and(|c| held.contains(c));
        for phrase in std::iter::once(&e.description).chain(&e.synonyms) {
            let text = LabelledText {
                text: phrase.clone(),
                label: Some(chapter.clone()),
                labels: None,
                entities: None,
            };
            if held_out {
                d.held_out.push(text);
            } else {
                d.train.push(text);
            }
        }
    }
    for (texts, max) in [(&mut d.train, max_train), (&mut d.held_out, max_held_out)] {
        texts.shuffle(&mut rng);
        texts.truncate(max);
    }
    d
}

/// Labels of the entity student.
pub const NER_LABELS: [&str; 7] = ["O", "B-ORG", "I-ORG", "B-MONEY", "I-MONEY", "B-DATE", "I-DATE"];

const EN_STEMS: [&str; 24] = [
    "Northwind",
    "Blue Harbor",
    "Silver Creek",
    "Red Rock",
    "Summit",
    "Evergreen",
    "Pioneer",
    "Atlas",
    "Orion",
    "Granite",
    "Crescent",
    "Lakeside",
    "Redwood",
    "Ironclad",
    "Golden Gate",
    "Maple",
    "Sterling",
    "Horizon",
    "Keystone",
    "Beacon",
    "Cedar Point",
    "Bright Star",
    "Harbor View",
    "Falcon",
];
const EN_SUFFIXES: [&str; 8] = [
    "Holdings",
    "Capital",
    "Group",
    "Industries",
    "Corporation",
    "Bank",
    "Energy",
    "Technologies",
];
const ZH_STEMS: [&str; 24] = [
    "华夏", "中信", "东方", "新华", "泰康", "长城", "平安", "宏达", "国泰", "海通", "天合", "盛世", "瑞丰", "鑫源",
    "信达", "兴业", "光大", "南方", "北辰", "金山", "银河", "星辰", "龙湖", "远洋",
];
const ZH_SUFFIXES: [&str; 8] = ["集团", "控股", "银行", "证券", "科技", "股份", "保险", "能源"];
/// Syllables and characters of made-up company names: half the training names are drawn from
/// them (entity substitution), so the student learns what a name looks like rather than a list.
const EN_SYLLABLES: [&str; 24] = [
    "ka", "lor", "ven", "dra", "mi", "tor", "sel", "bri", "nox", "ar", "quin", "del", "ro", "fen", "tal", "mar", "zen",
    "cor", "lis", "vek", "am", "bel", "tri", "os",
];
const ZH_NAME_CHARS: &str =
    "华中金东新恒泰长安宏国海天盛瑞鑫达通信兴光南北山银星龙远湖洋辰富利嘉丰源和德立正明宁康永顺福万鸿昌隆祥";
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// English, Chinese and mixed sentences; `{ORG}`, `{MONEY}`, `{DATE}` are filled in. The last
/// of each list is held out.
const EN_TEMPLATES: [&str; 5] = [
    "{ORG} reported revenue of {MONEY} for {DATE}.",
    "On {DATE}, {ORG} paid {MONEY} to {ORG}.",
    "{ORG} agreed to acquire {ORG} for {MONEY}.",
    "Net profit at {ORG} rose to {MONEY} in {DATE}.",
    "{ORG} will pay a dividend of {MONEY} on {DATE}.",
];
const ZH_TEMPLATES: [&str; 5] = [
    "{ORG}{DATE}实现营业收入{MONEY}。",
    "{ORG}于{DATE}向{ORG}支付{MONEY}。",
    "{ORG}拟以{MONEY}收购{ORG}。",
    "{DATE}，{ORG}净利润{MONEY}。",
    "{ORG}宣布{DATE}派发股息{MONEY}。",
];
const MIXED_TEMPLATES: [&str; 3] = [
    "{ORG} reported revenue of {MONEY} in {DATE}; {ORG}净利润{MONEY}。",
    "据{ORG}公告, {ORG} paid {MONEY} on {DATE}.",
    "{ORG} and {ORG} signed a deal worth {MONEY}，{DATE}生效。",
];

/// Sentence generator over one side of the split (names, templates).
struct Generator<'a> {
    en_stems: &'a [&'static str],
    zh_stems: &'a [&'static str],
    templates: Vec<(&'static str, bool)>,
    /// Share of names made up from syllables or characters instead of the stems.
    made_up: f64,
}

impl Generator<'_> {
    fn org(&self, rng: &mut ChaCha8Rng, zh: bool) -> String {
        let made_up = rng.random_bool(self.made_up);
        let stem = match (zh, made_up) {
            (true, true) => {
                let chars: Vec<char> = ZH_NAME_CHARS.chars().collect();
                (0..2).filter_map(|_| chars.choose(rng)).collect()
            }
            (false, true) => {
                let word = |rng: &mut ChaCha8Rng| {
                    let n = rng.random_range(2..4);
                    let w: String = (0..n).filter_map(|_| EN_SYLLABLES.choose(rng).copied()).collect();
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_uppercase().chain(c).collect::<String>())
                        .unwrap_or_default()
                };
                match rng.random_bool(0.3) {
                    true => format!("{} {}", word(rng), word(rng)),
                    false => word(rng),
                }
            }
            (true, false) => self.zh_stems.choose(rng).copied().unwrap_or_default().to_string(),
            (false, false) => self.en_stems.choose(rng).copied().unwrap_or_default().to_string(),
        };
        match zh {
            true => format!("{stem}{}", ZH_SUFFIXES.choose(rng).copied().unwrap_or_default()),
            false => format!("{stem} {}", EN_SUFFIXES.choose(rng).copied().unwrap_or_default()),
        }
    }

    fn sentence(&self, rng: &mut ChaCha8Rng) -> LabelledText {
        let (template, zh_first) = *self.templates.choose(rng).unwrap_or(&(EN_TEMPLATES[0], false));
        let mut text = String::new();
        let mut entities = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            let close = rest[open..].find('}').map_or(rest.len(), |c| open + c);
            let slot = &rest[open + 1..close];
            // A slot is Chinese when Chinese text is next to it.
            let zh = match (text.chars().last(), rest[close + 1..].chars().next()) {
                (Some(c), _) if !c.is_ascii() => true,
                (_, Some(c)) if !c.is_ascii() && c != '，' => true,
                (None, _) => zh_first,
                _ => false,
            };
            let value = match slot {
                "ORG" => self.org(rng, zh),
                "MONEY" => money(rng, zh),
                _ => date(rng, zh),
            };
            let start = text.chars().count();
            text.push_str(&value);
            entities.push(EntitySpan {
                start,
                end: start + value.chars().count(),
                label: slot.to_string(),
            });
            rest = rest.get(close + 1..).unwrap_or_default();
        }
        text.push_str(rest);
        LabelledText {
            text,
            label: None,
            labels: None,
            entities: Some(entities),
        }
    }
}

fn money(rng: &mut ChaCha8Rng, zh: bool) -> String {
    let whole: u32 = rng.random_range(1..2000);
    let tenth: u32 = rng.random_range(0..10);
    match (zh, rng.random_range(0..4)) {
        (true, 0) => format!("{whole}.{tenth}亿元"),
        (true, 1) => format!("{whole}万元"),
        (true, 2) => format!("{whole}.{tenth}亿美元"),
        (true, _) => format!("{},{:03}亿港元", whole % 9 + 1, whole % 1000),
        (false, 0) => format!("${whole}.{tenth} billion"),
        (false, 1) => format!("{},{:03} million yuan", whole % 9 + 1, whole % 1000),
        (false, 2) => format!("USD {whole} million"),
        (false, _) => format!("€{whole}.{tenth} million"),
    }
}

fn date(rng: &mut ChaCha8Rng, zh: bool) -> String {
    let year: u32 = rng.random_range(2015..2030);
    let month: usize = rng.random_range(1..=12);
    let day: u32 = rng.random_range(1..=28);
    match (zh, rng.random_range(0..3)) {
        (true, 0) => format!("{year}年{month}月{day}日"),
        (true, 1) => format!("{year}年第{}季度", ["一", "二", "三", "四"][month % 4]),
        (true, _) => format!("{year}年上半年"),
        (false, 0) => format!("{day} {} {year}", MONTHS[month - 1]),
        (false, 1) => format!("Q{} {year}", month % 4 + 1),
        (false, _) => format!("fiscal {year}"),
    }
}

/// `train` and `held_out` sentences of companies, amounts and dates in English, Chinese and
/// both, drawn with `seed`. Held-out sentences name companies never trained on (a quarter of
/// the names); `held_out` uses the training templates, `held_out_new_phrasing` the templates
/// held back (the last of each list).
pub fn zh_en_entities(train: usize, held_out: usize, seed: u64) -> EncoderDataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let split = |templates: &[&'static str], held: bool, zh: bool| -> Vec<(&'static str, bool)> {
        let (last, rest) = templates
            .split_last()
            .map_or((&[][..], templates), |(l, r)| (std::slice::from_ref(l), r));
        (if held { last } else { rest }).iter().map(|t| (*t, zh)).collect()
    };
    // (names held out, templates held out)
    let side = |held_names: bool, held_templates: bool| {
        let mut templates = split(&EN_TEMPLATES, held_templates, false);
        templates.extend(split(&ZH_TEMPLATES, held_templates, true));
        templates.extend(split(&MIXED_TEMPLATES, held_templates, false));
        let cut = |stems: &'static [&'static str]| {
            let at = stems.len() * 3 / 4;
            if held_names { &stems[at..] } else { &stems[..at] }
        };
        Generator {
            en_stems: cut(&EN_STEMS),
            zh_stems: cut(&ZH_STEMS),
            templates,
            made_up: if held_names { 0.0 } else { 0.5 },
        }
    };
    let (seen, unseen_names, unseen_phrasing) = (side(false, false), side(true, false), side(true, true));
    EncoderDataset {
        labels: NER_LABELS.iter().map(|l| l.to_string()).collect(),
        train: (0..train).map(|_| seen.sentence(&mut rng)).collect(),
        held_out: (0..held_out).map(|_| unseen_names.sentence(&mut rng)).collect(),
        held_out_new_phrasing: (0..held_out).map(|_| unseen_phrasing.sentence(&mut rng)).collect(),
        alphabet: ZH_STEMS
            .iter()
            .chain(&ZH_SUFFIXES)
            .chain(&[ZH_NAME_CHARS])
            .map(|s| format!("{s}\n"))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chapter_texts_carry_their_chapter_and_held_out_categories_never_train() {
        let xml = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/terminology/icd10cm_tabular_small.xml"
        );
        let t = crate::constrain::load_icd10cm_xml(std::path::Path::new(xml)).unwrap();
        let d = icd10cm_chapters(&t, 3, 10_000, 10_000, 1);
        assert!(!d.train.is_empty() && !d.held_out.is_empty());
        let entry_of = |text: &str| {
            t.entries
                .iter()
                .find(|e| e.description == text || e.synonyms.iter().any(|s| s == text))
        };
        let category = |text: &LabelledText| entry_of(&text.text).map(|e| e.code[..3].to_string());
        let trained: BTreeSet<_> = d.train.iter().filter_map(category).collect();
        for text in &d.held_out {
            assert!(!trained.contains(&category(text).unwrap()), "{}", text.text);
        }
        for text in d.train.iter().chain(&d.held_out) {
            let label = text.label.as_deref().unwrap();
            let (first, last) = label.split_once('-').unwrap();
            let code = &entry_of(&text.text).unwrap().code[..3];
            assert!(
                first <= code && code <= last && d.labels.iter().any(|l| l == label),
                "{code} in {label}"
            );
        }
    }

    #[test]
    fn entity_spans_are_the_characters_of_their_values() {
        let d = zh_en_entities(200, 50, 3);
        for t in d.train.iter().chain(&d.held_out) {
            let chars: Vec<char> = t.text.chars().collect();
            for e in t.entities.as_deref().unwrap_or_default() {
                let value: String = chars[e.start..e.end].iter().collect();
                assert!(
                    !value.trim().is_empty() && value.trim() == value,
                    "{}: {value:?}",
                    t.text
                );
            }
        }
        let text = |ts: &[LabelledText]| ts.iter().map(|t| t.text.clone()).collect::<BTreeSet<_>>();
        assert!(text(&d.train).is_disjoint(&text(&d.held_out)));
        assert!(d.train.iter().any(|t| t.text.contains("净利润") && !t.text.is_ascii()));
        let held_names = d
            .held_out
            .iter()
            .any(|t| t.text.contains("Falcon") || t.text.contains("远洋"));
        assert!(held_names && !d.train.iter().any(|t| t.text.contains("Falcon")));
    }
}
