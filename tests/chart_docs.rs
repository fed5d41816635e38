//! The chart's values are documented once, in values.schema.json: charts/sluice/README.md's
//! table is generated from it (with the defaults from values.yaml) and must match.
//! `SLUICE_BLESS=1 cargo test --test chart_docs` rewrites it.

use serde_json::Value;

const BEGIN: &str = "<!-- values: generated from values.schema.json by tests/chart_docs.rs -->\n";
const END: &str = "<!-- end of values -->\n";

fn rows(schema: &Value, defaults: &Value, at: &str, out: &mut Vec<String>) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    for (key, prop) in props {
        let path = if at.is_empty() {
            key.clone()
        } else {
            format!("{at}.{key}")
        };
        let default = &defaults[key];
        if prop["properties"].is_object() {
            rows(prop, default, &path, out);
            continue;
        }
        let kind = match &prop["type"] {
            Value::Array(types) => types
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" or "),
            t => t.as_str().unwrap_or("any").to_string(),
        };
        let allowed = prop["enum"]
            .as_array()
            .map(|values| {
                let values: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
                format!(" One of {}.", values.join(", ").replace('"', ""))
            })
            .unwrap_or_default();
        out.push(format!(
            "| `{path}` | {kind} | `{}` | {}{allowed} |",
            serde_json::to_string(default).unwrap_or_default(),
            prop["description"].as_str().unwrap_or_default()
        ));
    }
}

#[test]
fn the_chart_readme_lists_every_value_from_the_schema() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/sluice");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/values.schema.json")).unwrap(),
    )
    .unwrap();
    let defaults: Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{dir}/values.yaml")).unwrap())
            .unwrap();
    let mut table = vec![
        "| Value | Type | Default | What it does |".to_string(),
        "| --- | --- | --- | --- |".to_string(),
    ];
    rows(&schema, &defaults, "", &mut table);
    let readme_path = format!("{dir}/README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let (head, rest) = readme
        .split_once(BEGIN)
        .expect("README has the values marker");
    let (_, tail) = rest.split_once(END).expect("README has the end marker");
    let generated = format!("{head}{BEGIN}{}\n{END}{tail}", table.join("\n"));
    if std::env::var_os("SLUICE_BLESS").is_some() {
        std::fs::write(&readme_path, &generated).unwrap();
    }
    assert_eq!(
        readme, generated,
        "charts/sluice/README.md's values table is stale: SLUICE_BLESS=1 cargo test --test chart_docs"
    );
}
