//! Terminology loaders against release-format files: a small ICD-10-CM tabular XML written for
//! the tests, the full CMS 2026 release `scripts/setup.sh` installs, the order file, SNOMED CT
//! RF2 and plain lists; malformed files give errors that name the file and line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use distill_serve::constrain::{
    DescriptionTypes, SnomedOptions, Subset, Terminology, icd10cm_release, load_icd10cm_order, load_icd10cm_xml,
    load_list, load_snomed_rf2,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/terminology")
        .join(name)
}

fn billable(t: &Terminology) -> BTreeSet<&str> {
    t.entries
        .iter()
        .filter(|e| e.billable)
        .map(|e| e.code.as_str())
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn icd10cm_xml_expands_seventh_characters_into_billable_codes() {
    let t = load_icd10cm_xml(&fixture("icd10cm_tabular_small.xml")).unwrap();
    let stats = t.stats();
    assert_eq!((stats.codes, stats.billable), (28, 15), "{:?}", billable(&t));
    let expected: BTreeSet<&str> = [
        "E11.65", "E11.9", "I10", "S06.1X1A", "S06.1X1D", "S06.1X1S", "S06.1X7A", "S72.001A", "S72.001B", "S72.001S",
        "S72.002A", "S72.002B", "S72.002S", "S72.90XA", "S72.90XD",
    ]
    .into();
    assert_eq!(billable(&t), expected);
    let fracture = t.get("S72.001A").unwrap();
    assert_eq!(
        fracture.description,
        "Fracture of unspecified part of neck of right femur, initial encounter for closed fracture"
    );
    assert!(
        !t.get("S72.001").unwrap().billable,
        "a code that needs a 7th character is not billable"
    );
    assert!(!t.get("E11").unwrap().billable);
    assert!(t.get("S06.1X7D").is_none(), "S06 deaths take 7th character A only");
    let i10 = t.get("I10").unwrap();
    assert!(i10.synonyms.iter().any(|s| s == "high blood pressure"), "{i10:?}");
    assert_eq!(
        stats.synonyms,
        t.entries.iter().map(|e| e.synonyms.len()).sum::<usize>()
    );
}

/// The CMS code list names every code; the billable ones are those no longer code extends.
fn leaf_codes(list: &str) -> BTreeSet<String> {
    let codes: BTreeSet<&str> = list
        .lines()
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.contains('-') && !c.chars().all(|ch| ch.is_ascii_digit()))
        .collect();
    let sorted: Vec<&str> = codes.into_iter().collect();
    sorted
        .iter()
        .enumerate()
        .filter(|(i, c)| sorted.get(i + 1).is_none_or(|next| !next.starts_with(**c)))
        .map(|(_, c)| c.to_string())
        .collect()
}

#[test]
fn the_full_icd10cm_release_yields_exactly_its_billable_codes() {
    let (xml, list) = icd10cm_release();
    assert!(xml.exists(), "{} is missing: run scripts/setup.sh", xml.display());
    let t = load_icd10cm_xml(&xml).unwrap();
    let ours: BTreeSet<String> = billable(&t).into_iter().map(|c| c.replace('.', "")).collect();
    let cms = leaf_codes(&std::fs::read_to_string(list).unwrap());
    assert_eq!(ours.len(), cms.len());
    assert_eq!(ours, cms);
    assert_eq!(ours.len(), 74_719, "FY2026 April update");
    assert!(t.get("S72.001A").is_some_and(|e| e.billable));
    assert!(t.get("E11.9").is_some_and(|e| e.billable));
    // The tabular tree: a code with a 7th character up to its chapter, one parent each.
    let tree = t.hierarchy.as_ref().unwrap();
    let mut chain = vec!["S72.001A".to_string()];
    while let [parent] = tree.parents_of(chain.last().unwrap())[..] {
        chain.push(parent.to_string());
    }
    assert_eq!(
        chain,
        ["S72.001A", "S72.001", "S72.00", "S72.0", "S72", "S70-S79", "S00-T88"]
    );
    // Every code has exactly one parent: a code, or the block it opens.
    for e in &t.entries {
        assert_eq!(tree.parents_of(&e.code).len(), 1, "{}", e.code);
    }
}

/// Subsets of the real release against an independent reading of CMS's code list: a range
/// takes every billable code of its categories, a code takes everything under it.
#[test]
fn icd10cm_subsets_take_the_codes_of_their_categories_in_the_full_release() {
    let (xml, list) = icd10cm_release();
    let t = load_icd10cm_xml(&xml).unwrap();
    let cms = leaf_codes(&std::fs::read_to_string(list).unwrap());
    let count = |subset: &str| {
        let subset = Subset::parse(subset).unwrap().resolve(&t).unwrap();
        billable(&t).into_iter().filter(|c| subset.contains(c)).count()
    };
    let in_categories = |keep: &dyn Fn(&str) -> bool| cms.iter().filter(|c| keep(&c[..3])).count();
    let ischaemic = in_categories(&|cat| ("I20"..="I25").contains(&cat));
    assert!(ischaemic > 50, "{ischaemic}");
    assert_eq!(count("I20-I25"), ischaemic);
    let injuries = in_categories(&|cat| cat.starts_with('S') || (cat.starts_with('T') && cat <= "T88"));
    assert_eq!(count("S00-T88"), injuries);
    let under = cms.iter().filter(|c| c.starts_with("E116")).count();
    assert!(under > 5, "{under}");
    assert_eq!(count("E11.6"), under);
    assert_eq!(count("I20-I25, E11.6"), ischaemic + under);
    // Chapters take the range their description gives: 9 is I00-I99, 19 is S00-T88.
    assert_eq!(t.chapters.len(), 22, "{:?}", t.chapters);
    assert_eq!(count("chapter:9"), cms.iter().filter(|c| c.starts_with('I')).count());
    assert_eq!(count("chapter:19"), injuries);

    // And against the tabular XML itself, walked as text: chapter 9's block, the names of its
    // `<diag>`s, the leaves among them (chapter 9 has no 7th characters).
    let text = std::fs::read_to_string(&xml).unwrap();
    let start = text.find("<name>9</name>").unwrap();
    let block = &text[start..start + text[start..].find("</chapter>").unwrap()];
    let names: BTreeSet<&str> = block
        .split("<diag>")
        .skip(1)
        .filter_map(|d| d.trim_start().strip_prefix("<name>")?.split_once("</name>"))
        .map(|(name, _)| name)
        .collect();
    let sorted: Vec<&str> = names.iter().copied().collect();
    let leaves: Vec<&str> = sorted
        .iter()
        .enumerate()
        .filter(|(i, c)| sorted.get(i + 1).is_none_or(|next| !next.starts_with(**c)))
        .map(|(_, c)| *c)
        .collect();
    assert_eq!(count("chapter:9"), leaves.len());
    let ischaemic_leaves = leaves.iter().filter(|c| ("I20"..="I25~").contains(*c)).count();
    assert_eq!(count("I20-I25"), ischaemic_leaves);
}

#[test]
fn icd10cm_order_file_reads_codes_with_dots_and_flags() {
    let t = load_icd10cm_order(&fixture("icd10cm_order_small.txt")).unwrap();
    assert_eq!((t.stats().codes, t.stats().billable), (4, 3));
    assert!(!t.get("A00").unwrap().billable);
    assert_eq!(
        t.get("S72.001A").unwrap().description,
        "Fracture of unspecified part of neck of right femur, initial encounter for closed fracture"
    );
    assert!(t.get("E11.9").unwrap().billable);
}

const RF2_HEADER: &str =
    "id\teffectiveTime\tactive\tmoduleId\tconceptId\tlanguageCode\ttypeId\tterm\tcaseSignificanceId";

#[test]
fn snomed_rf2_keeps_active_rows_and_tells_names_from_synonyms() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        "1\t20250101\t1\t9\t44054006\ten\t900000000000003001\tDiabetes mellitus type 2 (disorder)\t9",
        "2\t20250101\t1\t9\t44054006\ten\t900000000000013009\tType 2 diabetes mellitus\t9",
        "3\t20250101\t0\t9\t44054006\ten\t900000000000013009\tRetired synonym\t9",
        "4\t20250101\t1\t9\t38341003\ten\t900000000000003001\tHypertensive disorder (disorder)\t9",
        "5\t20250101\t1\t9\t38341003\ten\t900000000000013009\tHigh blood pressure\t9",
        "6\t20250101\t1\t9\t38341003\tes\t900000000000013009\tHipertension arterial\t9",
    ];
    let text = format!("{RF2_HEADER}\r\n{}\r\n", rows.join("\r\n"));
    let path = write(dir.path(), "sct2_Description_Snapshot-en_INT_20250101.txt", &text);
    let english = SnomedOptions {
        languages: vec!["en".into()],
        ..Default::default()
    };
    let t = load_snomed_rf2(&path, &english).unwrap();
    assert_eq!((t.stats().codes, t.stats().synonyms), (2, 2));
    let dm = t.get("44054006").unwrap();
    assert_eq!(dm.description, "Diabetes mellitus type 2 (disorder)");
    assert_eq!(dm.synonyms, vec!["Type 2 diabetes mellitus".to_string()]);
    let all = load_snomed_rf2(&path, &SnomedOptions::default()).unwrap();
    assert_eq!(all.stats().synonyms, 3, "every language when none is named");
    let synonyms_only = SnomedOptions {
        types: DescriptionTypes::Synonyms,
        concepts: Some(["38341003".to_string()].into()),
        ..english
    };
    let t = load_snomed_rf2(&path, &synonyms_only).unwrap();
    assert_eq!(t.entries.len(), 1);
    assert_eq!(t.entries[0].description, "High blood pressure");

    let bad = write(dir.path(), "bad_header.txt", "id\tterm\n1\tx\n");
    let e = load_snomed_rf2(&bad, &SnomedOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad_header.txt:1") && e.contains("RF2"), "{e}");
    let short = write(
        dir.path(),
        "short_row.txt",
        &format!("{RF2_HEADER}\n{}\n1\t2\t1\n", rows[0]),
    );
    let e = load_snomed_rf2(&short, &SnomedOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("short_row.txt:3") && e.contains("3 columns"), "{e}");
}

#[test]
fn lists_read_tsv_and_csv_with_synonyms() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = write(
        dir.path(),
        "tickers.tsv",
        "code\tterm\tsynonyms\nAAPL\tApple Inc.\tApple|Apple Computer\nMSFT\tMicrosoft Corporation\t\n",
    );
    let t = load_list(&tsv).unwrap();
    assert_eq!((t.stats().codes, t.stats().synonyms), (2, 2));
    assert_eq!(t.get("AAPL").unwrap().synonyms, vec!["Apple", "Apple Computer"]);
    let csv = write(dir.path(), "loinc.csv", "term,code\n\"Glucose, serum\",2345-7\n");
    assert_eq!(
        load_list(&csv).unwrap().get("2345-7").unwrap().description,
        "Glucose, serum"
    );

    let no_term = write(dir.path(), "no_term.tsv", "code\tname\nA\tB\n");
    let e = load_list(&no_term).unwrap_err().to_string();
    assert!(e.contains("no_term.tsv:1") && e.contains("`term`"), "{e}");
    let missing = write(dir.path(), "missing.tsv", "code\tterm\nA\tAlpha\nB\n");
    let e = load_list(&missing).unwrap_err().to_string();
    assert!(e.contains("missing.tsv:3") && e.contains("missing term"), "{e}");
}

#[test]
fn malformed_icd10cm_files_are_errors_with_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(fixture("icd10cm_tabular_small.xml")).unwrap();
    let truncated = write(dir.path(), "truncated.xml", &good[..good.len() / 2]);
    let e = load_icd10cm_xml(&truncated).unwrap_err().to_string();
    assert!(e.contains("truncated.xml"), "{e}");
    let mismatched = write(
        dir.path(),
        "mismatched.xml",
        "<ICD10CM.tabular>\n<chapter>\n</diag>\n</ICD10CM.tabular>\n",
    );
    let e = load_icd10cm_xml(&mismatched).unwrap_err().to_string();
    assert!(e.contains("mismatched.xml:3") && e.contains("malformed XML"), "{e}");
    let wrong_root = write(dir.path(), "root.xml", "<?xml version=\"1.0\"?>\n<html></html>\n");
    let e = load_icd10cm_xml(&wrong_root).unwrap_err().to_string();
    assert!(e.contains("root.xml:2") && e.contains("<ICD10CM.tabular>"), "{e}");
    let nameless = write(
        dir.path(),
        "nameless.xml",
        "<ICD10CM.tabular>\n<chapter>\n<section>\n<diag>\n<desc>x</desc>\n</diag>\n</section>\n</chapter>\n</ICD10CM.tabular>\n",
    );
    let e = load_icd10cm_xml(&nameless).unwrap_err().to_string();
    assert!(e.contains("nameless.xml:6") && e.contains("without a <name>"), "{e}");
    let order = write(
        dir.path(),
        "order.txt",
        "00001 A00     0 Cholera\n0000X B00     7 Bad\n",
    );
    let e = load_icd10cm_order(&order).unwrap_err().to_string();
    assert!(e.contains("order.txt:2"), "{e}");
    let binary = write(dir.path(), "binary.xml", "<ICD10CM.tabular>\n");
    std::fs::write(&binary, b"<ICD10CM.tabular>\n\xff\xfe").unwrap();
    let e = load_icd10cm_xml(&binary).unwrap_err().to_string();
    assert!(e.contains("binary.xml:2") && e.contains("UTF-8"), "{e}");
}

#[test]
fn terminology_inspect_prints_counts_and_errors_name_the_line() {
    let bin = Path::new(env!("CARGO_BIN_EXE_distill-serve"));
    let out = std::process::Command::new(bin)
        .args(["terminology", "inspect", "icd10cm-xml"])
        .arg(fixture("icd10cm_tabular_small.xml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["kind"], "icd10cm-xml");
    assert_eq!(report["stats"]["codes"], 28);
    assert_eq!(report["stats"]["billable"], 15);
    assert!(report["load_ms"].as_f64().unwrap() >= 0.0);
    assert!(report["compile_ms"].as_f64().unwrap() >= 0.0);
    assert!(report["automaton_bytes"]["codes"].as_u64().unwrap() > 0);
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.tsv", "code\tterm\nX\n");
    let out = std::process::Command::new(bin)
        .args(["terminology", "inspect", "tsv"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.tsv:2") && stderr.contains("missing term"),
        "{stderr}"
    );
}
