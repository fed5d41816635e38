//! `crds/` (and the Helm chart's copy) is generated: it must match what the code produces,
//! byte for byte.

use std::path::Path;

#[test]
fn committed_crds_match_the_code() {
    for dir in ["crds", "charts/sluice/crds", "config/crd/bases"] {
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

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The Helm chart ships the approval policy from `config/approvals` unchanged (behind its
/// `approvalPolicy.enabled` switch).
#[test]
fn the_chart_ships_the_approval_policy_unchanged() {
    let config = read("config/approvals/approvals.yaml");
    let chart = read("charts/sluice/templates/approvals.yaml");
    assert_eq!(
        format!("{{{{- if .Values.approvalPolicy.enabled }}}}\n{config}{{{{- end }}}}\n"),
        chart,
        "copy config/approvals/approvals.yaml into charts/sluice/templates/approvals.yaml"
    );
}

/// The operator's rules have one source, config/rbac/role.yaml; the chart ships it unchanged.
#[test]
fn the_chart_grants_the_rules_of_config_rbac() {
    assert_eq!(
        read("config/rbac/role.yaml"),
        read("charts/sluice/files/role.yaml"),
        "copy config/rbac/role.yaml to charts/sluice/files/role.yaml"
    );
}
