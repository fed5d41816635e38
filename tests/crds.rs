//! `crds/` (and the Helm chart's copy) is generated: it must match what the code produces,
//! byte for byte.

use std::path::Path;

#[test]
fn committed_crds_match_the_code() {
    for dir in ["crds", "charts/sluice/crds"] {
        check(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir));
    }
}

fn check(dir: &Path) {
    let drifted = sluice::crdgen::drift(dir).unwrap();
    assert!(
        drifted.is_empty(),
        "these CRD files differ from src/api: {drifted:?}\nrun `make crds` and commit the result"
    );
    let files = std::fs::read_dir(dir).unwrap().count();
    assert_eq!(
        files,
        sluice::crdgen::all().len(),
        "crds/ holds a file no type generates"
    );
}
