//! Revisions: a pod template's identity (its hash) and the labels that tell revisions apart.

pub use crate::k8s::labels::{
    HASH_LABEL, REVISION_ANNOTATION, ROLLOUT_LABEL, SCALE_DOWN_AT_ANNOTATION, template_hash,
};

/// The ReplicaSet name of a revision.
pub fn replica_set_name(rollout: &str, hash: &str) -> String {
    // ReplicaSet names are DNS subdomains (253), but pod names add a suffix and must stay
    // label-safe (63): keep the rollout part short enough.
    let max_prefix = 63 - 1 - hash.len() - 6;
    let prefix: String = rollout.chars().take(max_prefix).collect();
    format!("{}-{hash}", prefix.trim_end_matches('-'))
}

/// A ReplicaSet as the history pruning sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub name: String,
    pub hash: String,
    pub revision: i64,
    pub replicas: i32,
}

/// The ReplicaSets to delete so that at most `limit` old revisions remain: only scaled-down
/// ones that are neither stable, canary nor kept for a blue-green rollback, oldest first.
pub fn beyond_history_limit(entries: &[HistoryEntry], limit: usize, keep: &[&str]) -> Vec<String> {
    let mut old: Vec<&HistoryEntry> = entries
        .iter()
        .filter(|e| e.replicas == 0 && !keep.contains(&e.hash.as_str()))
        .collect();
    old.sort_by_key(|e| std::cmp::Reverse(e.revision));
    old.into_iter()
        .skip(limit)
        .map(|e| e.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some(image.into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
        }
    }

    #[test]
    fn same_template_same_hash_other_template_other_hash() {
        assert_eq!(
            template_hash(&template("a:1")),
            template_hash(&template("a:1"))
        );
        assert_ne!(
            template_hash(&template("a:1")),
            template_hash(&template("a:2"))
        );
        assert_eq!(template_hash(&template("a:1")).len(), 10);
    }

    #[test]
    fn history_keeps_the_newest_old_revisions_and_never_live_ones() {
        let entry = |hash: &str, revision: i64, replicas: i32| HistoryEntry {
            name: format!("web-{hash}"),
            hash: hash.into(),
            revision,
            replicas,
        };
        let entries = vec![
            entry("a", 1, 0),
            entry("b", 2, 0),
            entry("c", 3, 0),
            entry("d", 4, 5),
            entry("e", 5, 0),
        ];
        assert_eq!(
            beyond_history_limit(&entries, 2, &["d"]),
            vec!["web-b", "web-a"]
        );
        assert_eq!(
            beyond_history_limit(&entries, 1, &["d"]),
            vec!["web-c", "web-b", "web-a"]
        );
        assert_eq!(
            beyond_history_limit(&entries, 0, &["d", "e"]),
            vec!["web-c", "web-b", "web-a"]
        );
        assert!(beyond_history_limit(&entries, 10, &["d"]).is_empty());
    }

    #[test]
    fn names_stay_label_safe() {
        let long = "x".repeat(80);
        let name = replica_set_name(&long, "bcdfghjklm");
        assert!(name.len() <= 57, "{name}");
        assert!(name.ends_with("-bcdfghjklm"));
        assert_eq!(
            replica_set_name("checkout", "bcdfghjklm"),
            "checkout-bcdfghjklm"
        );
    }
}
