//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz entry points
//! on stable, so every input a fuzzer kept, and every crash it ever found, stays a test.
//! Finding new inputs is `make fuzz` (cargo-fuzz, nightly).

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("query_template", sluice::fuzzing::query_template),
    ("condition", sluice::fuzzing::condition),
    ("durations", sluice::fuzzing::durations),
    ("virtual_service", sluice::fuzzing::virtual_service),
    ("http_route", sluice::fuzzing::http_route),
    ("plugin_names", sluice::fuzzing::plugin_names),
];

#[test]
fn every_corpus_input_runs_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "no corpus for {name}");
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} panicked on {}", input.display());
        }
    }
}
