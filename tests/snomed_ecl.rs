//! SNOMED CT expression constraints over the hand-built RF2 release in
//! `tests/fixtures/snomed`: hand-worked answers for each operator, then random expressions
//! checked against a brute-force evaluation that reads the release files itself.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::Lcg;
use distill_serve::constrain::{SubsetText, Terminologies, TerminologySpec};

const MODULE: &str = "9990000001";

fn release_dir() -> std::path::PathBuf {
    common::repo_file("tests/fixtures/snomed")
}

fn terminologies() -> Terminologies {
    let spec: TerminologySpec = format!("sct=snomed-rf2:{}", release_dir().display()).parse().unwrap();
    Terminologies::load(&[spec]).unwrap()
}

/// Codes `ecl` selects, through the server's evaluation.
fn select(t: &Terminologies, ecl: &str) -> BTreeSet<String> {
    let selected = t
        .select("sct", Some(&SubsetText::One(ecl.into())))
        .unwrap_or_else(|e| panic!("{ecl}: {e}"));
    selected
        .members
        .iter()
        .map(|&i| selected.terminology.entries[i].code.clone())
        .collect()
}

/// Concept ids by their last digits: `"20"` is 1000020.
fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter()
        .map(|id| (1_000_000 + id.parse::<u32>().unwrap()).to_string())
        .collect()
}

#[test]
fn the_release_folder_and_its_description_file_load_the_same_hierarchy() {
    let t = terminologies();
    let summary = &t.summaries()[0];
    assert_eq!(
        summary.release.version,
        format!("http://snomed.info/sct/{MODULE}/version/20260301")
    );
    assert_eq!(summary.release.module.as_deref(), Some(MODULE));
    // 16 concepts carry an active description; the retired one does not.
    assert_eq!(summary.stats.codes, 16);
    let file = release_dir().join("Snapshot/Terminology/sct2_Description_Snapshot-en_TEST_20260301.txt");
    let spec: TerminologySpec = format!("sct=snomed-rf2:{}", file.display()).parse().unwrap();
    let from_file = Terminologies::load(&[spec]).unwrap();
    for ecl in ["<< 1000020", "^ 1000300", "> 1000070"] {
        assert_eq!(select(&from_file, ecl), select(&t, ecl), "{ecl}");
    }
}

#[test]
fn each_operator_selects_what_the_hierarchy_says() {
    let t = terminologies();
    let cases: [(&str, &[&str]); 14] = [
        ("1000050 |Acute myocardial infarction|", &["50"]),
        ("<< 1000020 |Disorder of heart|", &["20", "40", "50", "60", "70", "140"]),
        // The retired concept (130) has no active description; viral pneumonia's is-a to the
        // heart was retired.
        ("< 1000010", &["20", "30", "40", "50", "60", "70", "80", "90", "140"]),
        ("<! 1000020", &["40", "70", "140"]),
        ("> 1000070", &["01", "10", "20", "30"]),
        (">> 1000090", &["01", "10", "30", "80", "90"]),
        (">! 1000070", &["20", "30"]),
        // The bypass's attribute row pointing at myocardial infarction is no is-a.
        ("> 1000120", &["01", "100", "110"]),
        ("^ 1000300 |Problem list|", &["50", "80", "120"]),
        ("<< ^ 1000310", &["40", "50", "60", "110", "120"]),
        ("<< 1000020 AND << 1000030", &["70"]),
        ("<< 1000020, << 1000030", &["70"]),
        ("<< 1000030 OR ^ 1000310", &["30", "40", "70", "80", "90", "110"]),
        ("(<< 1000010 MINUS << 1000020) MINUS 1000010", &["30", "80", "90"]),
    ];
    for (ecl, expected) in cases {
        assert_eq!(select(&t, ecl), set(expected), "{ecl}");
    }
    assert_eq!(select(&t, "*").len(), 16);
    // A list is the union of its parts.
    let listed = t
        .select(
            "sct",
            Some(&SubsetText::Many(vec!["<! 1000020".into(), "1000090".into()])),
        )
        .unwrap();
    assert_eq!(listed.members.len(), 4);
    assert_eq!(listed.provenance.subset.as_deref(), Some("(<! 1000020 OR 1000090)"));
}

#[test]
fn bad_expressions_name_their_fault() {
    let t = terminologies();
    for (ecl, named) in [
        ("<< 999", "concept 999 is not in this release"),
        ("^ 1000020", "not a reference set"),
        (
            "< 1000010 : 9990000100 = 1000040",
            "refinements (`:`) are not supported",
        ),
        ("<< 1000020 OR << 1000030 MINUS 1000070", "needs parentheses"),
    ] {
        let Err(e) = t.select("sct", Some(&SubsetText::One(ecl.into()))) else {
            panic!("{ecl} was accepted");
        };
        assert!(e.to_string().contains(named), "{ecl}: {e}");
    }
}

/// The release as the test reads it: active is-a edges, active refset members, and the
/// concepts with an active description.
struct Fixture {
    parents: BTreeMap<String, BTreeSet<String>>,
    refsets: BTreeMap<String, BTreeSet<String>>,
    concepts: BTreeSet<String>,
}

fn columns(path: &str) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(release_dir().join(path)).unwrap();
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim_end().split('\t').map(String::from).collect())
        .collect()
}

impl Fixture {
    fn read() -> Self {
        let mut f = Fixture {
            parents: BTreeMap::new(),
            refsets: BTreeMap::new(),
            concepts: BTreeSet::new(),
        };
        for row in columns("Snapshot/Terminology/sct2_Description_Snapshot-en_TEST_20260301.txt") {
            if row[2] == "1" {
                f.concepts.insert(row[4].clone());
            }
        }
        for row in columns("Snapshot/Terminology/sct2_Relationship_Snapshot_TEST_20260301.txt") {
            if row[2] == "1" && row[7] == "116680003" {
                f.parents.entry(row[4].clone()).or_default().insert(row[5].clone());
            }
        }
        for row in columns("Snapshot/Refset/Content/der2_Refset_SimpleSnapshot_TEST_20260301.txt") {
            if row[2] == "1" {
                f.refsets.entry(row[4].clone()).or_default().insert(row[5].clone());
            }
        }
        f
    }

    /// Whether `a` is a proper descendant of `b`, by trying every path upwards.
    fn below(&self, a: &str, b: &str) -> bool {
        self.parents
            .get(a)
            .is_some_and(|ps| ps.iter().any(|p| p == b || self.below(p, b)))
    }

    /// Every entry `op` relates to some member of `focus`, by brute force.
    fn apply(&self, op: &str, focus: &BTreeSet<String>) -> BTreeSet<String> {
        let parents_of = |c: &str| self.parents.get(c).cloned().unwrap_or_default();
        self.concepts
            .iter()
            .filter(|c| {
                focus.iter().any(|f| match op {
                    "<" => self.below(c, f),
                    "<<" => *c == f || self.below(c, f),
                    ">" => self.below(f, c),
                    ">>" => *c == f || self.below(f, c),
                    "<!" => parents_of(c).contains(f),
                    ">!" => parents_of(f).contains(*c),
                    _ => unreachable!(),
                })
            })
            .cloned()
            .collect()
    }
}

/// A random expression and the set brute force gives it.
fn random_expression(f: &Fixture, rng: &mut Lcg, depth: usize) -> (String, BTreeSet<String>) {
    let concepts: Vec<&String> = f.concepts.iter().filter(|c| !f.refsets.contains_key(*c)).collect();
    match if depth == 0 { rng.below(3) } else { rng.below(6) } {
        0 => {
            let c = concepts[rng.below(concepts.len())].clone();
            (c.clone(), BTreeSet::from([c]))
        }
        1 => {
            let op = ["<", "<<", ">", ">>", "<!", ">!"][rng.below(6)];
            let c = concepts[rng.below(concepts.len())].clone();
            (format!("{op} {c}"), f.apply(op, &BTreeSet::from([c])))
        }
        2 => {
            let refsets: Vec<&String> = f.refsets.keys().collect();
            let r = refsets[rng.below(refsets.len())];
            let members: BTreeSet<String> = f.refsets[r].intersection(&f.concepts).cloned().collect();
            (format!("^ {r}"), members)
        }
        3 => {
            let op = ["<", "<<", ">", ">>"][rng.below(4)];
            let (inner, focus) = random_expression(f, rng, depth - 1);
            (format!("{op} ({inner})"), f.apply(op, &focus))
        }
        k => {
            let (a, sa) = random_expression(f, rng, depth - 1);
            let (b, sb) = random_expression(f, rng, depth - 1);
            let word = ["OR", "AND", "MINUS"][if k == 4 { rng.below(2) } else { 2 }];
            let s = match word {
                "OR" => sa.union(&sb).cloned().collect(),
                "AND" => sa.intersection(&sb).cloned().collect(),
                _ => sa.difference(&sb).cloned().collect(),
            };
            (format!("({a}) {word} ({b})"), s)
        }
    }
}

#[test]
fn random_expressions_agree_with_brute_force() {
    let (t, f) = (terminologies(), Fixture::read());
    let mut rng = Lcg(18);
    let mut nonempty = 0;
    for _ in 0..400 {
        let (ecl, expected) = random_expression(&f, &mut rng, 3);
        nonempty += usize::from(!expected.is_empty());
        assert_eq!(select(&t, &ecl), expected, "{ecl}");
    }
    // The generator must exercise more than empty sets for the comparison to mean anything.
    assert!(nonempty > 200, "only {nonempty} of 400 expressions selected anything");
}
