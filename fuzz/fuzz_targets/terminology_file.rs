//! The terminology loaders: ICD-10-CM tabular XML and order file, SNOMED CT RF2 descriptions,
//! TSV and CSV lists. They read files, so each input is written to one first.
#![no_main]

use distill_serve::constrain::{
    DescriptionTypes, SnomedOptions, load_icd10cm_order, load_icd10cm_xml, load_list, load_snomed_rf2,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, content)) = data.split_first() else {
        return;
    };
    let Ok(dir) = tempfile::tempdir() else { return };
    let name = ["t.xml", "order.txt", "rf2.txt", "list.tsv", "list.csv"][usize::from(which) % 5];
    let path = dir.path().join(name);
    if std::fs::write(&path, content).is_err() {
        return;
    }
    let _ = match which % 5 {
        0 => load_icd10cm_xml(&path),
        1 => load_icd10cm_order(&path),
        2 => load_snomed_rf2(
            &path,
            &SnomedOptions {
                languages: Vec::new(),
                types: DescriptionTypes::All,
                concepts: None,
            },
        ),
        _ => load_list(&path),
    };
});
