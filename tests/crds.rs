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

/// The Helm chart ships the approval policy from `config/approvals` unchanged.
#[test]
fn the_chart_ships_the_approval_policy_unchanged() {
    let root = env!("CARGO_MANIFEST_DIR");
    let config =
        std::fs::read_to_string(format!("{root}/config/approvals/approvals.yaml")).unwrap();
    let chart =
        std::fs::read_to_string(format!("{root}/charts/sluice/templates/approvals.yaml")).unwrap();
    assert_eq!(
        config, chart,
        "copy config/approvals/approvals.yaml to charts/sluice/templates/approvals.yaml"
    );
}
