//! distill-serve: an inference server for distilled INT8 student language models.
//!
//! The student toolchain (checkpoints, tiny students, ONNX export and INT8 quantisation,
//! reference forwards), the ONNX Runtime engine, generation, the model repository and the
//! HTTP API.

pub mod api;
pub mod audit;
pub mod auth;
pub mod checkpoint;
pub mod config;
pub mod constrain;
pub mod distill;
pub mod doctor;
pub mod engine;
pub mod export;
pub mod generate;
pub mod hash;
pub mod infer;
pub mod kernels;
pub mod lifecycle;
pub mod metrics;
pub mod paths;
pub mod recipe;
pub mod reference;
pub mod repository;
pub mod request_id;
pub mod scheduler;
pub mod server;
pub mod telemetry;
pub mod tiny;
pub mod tokenize;
pub mod transport;
pub mod watch;

#[cfg(test)]
mod module_graph {
    //! The top-level modules must not import each other in a circle (README, "Layout").

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// For each top-level module, the other top-level modules its non-test code names as
    /// `crate::<name>`.
    fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path.strip_prefix(src).unwrap().to_string_lossy().into_owned();
                let top = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
                if !rel.ends_with(".rs") || top == "lib" || top == "main" {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                let targets = graph.entry(top.clone()).or_default();
                for (i, _) in code.match_indices("crate::") {
                    let name: String = code[i + 7..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if name != top {
                        targets.insert(name);
                    }
                }
            }
        }
        graph
    }

    /// A circle through `from`, if there is one (depth-first search).
    fn circle(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
        let mut path = vec![from.to_string()];
        let mut seen = BTreeSet::new();
        fn walk(
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            seen: &mut BTreeSet<String>,
        ) -> bool {
            let last = path.last().cloned().unwrap_or_default();
            for next in graph.get(&last).into_iter().flatten() {
                if *next == path[0] {
                    path.push(next.clone());
                    return true;
                }
                if seen.insert(next.clone()) {
                    path.push(next.clone());
                    if walk(graph, path, seen) {
                        return true;
                    }
                    path.pop();
                }
            }
            false
        }
        walk(graph, &mut path, &mut seen).then_some(path)
    }

    #[test]
    fn top_level_modules_import_each_other_without_circles() {
        let graph = edges(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
        assert!(
            graph.get("api").is_some_and(|t| t.contains("repository")),
            "the scan finds edges"
        );
        for module in graph.keys() {
            assert_eq!(circle(&graph, module), None, "import circle through `{module}`");
        }
    }
}
