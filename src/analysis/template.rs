//! Query templates: `{{rollout.name}}` and friends, replaced by values that cannot break out
//! of a PromQL string.

/// The values a query may refer to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TemplateVars {
    pub rollout_name: String,
    pub rollout_namespace: String,
    pub canary_revision: String,
    pub stable_revision: String,
    /// For ErrorBudget queries: the window being evaluated, e.g. `30d`.
    pub window: Option<String>,
}

/// A template that names a variable Sluice does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown template variable {{{{{0}}}}}: use rollout.name, rollout.namespace, canary.revision, stable.revision or window"
)]
pub struct UnknownVariable(pub String);

/// Replaces every `{{ name }}` in `query`.
pub fn render(query: &str, vars: &TemplateVars) -> Result<String, UnknownVariable> {
    let mut out = String::with_capacity(query.len());
    let mut rest = query;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = after[..end].trim();
        let value = match name {
            "rollout.name" => escape(&vars.rollout_name),
            "rollout.namespace" => escape(&vars.rollout_namespace),
            "canary.revision" => escape(&vars.canary_revision),
            "stable.revision" => escape(&vars.stable_revision),
            "window" => match &vars.window {
                Some(window) => escape(window),
                None => return Err(UnknownVariable(name.to_string())),
            },
            _ => return Err(UnknownVariable(name.to_string())),
        };
        out.push_str(&value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Escapes a value for use inside a double- or single-quoted PromQL string, and strips
/// anything that is not printable ASCII, so a value can never end the string early.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\'' => out.push_str("\\'"),
            '`' => {}
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars() -> TemplateVars {
        TemplateVars {
            rollout_name: "checkout".into(),
            rollout_namespace: "shop".into(),
            canary_revision: "6d4f9b7c8".into(),
            stable_revision: "5c8b7a6d4".into(),
            window: Some("30d".into()),
        }
    }

    #[test]
    fn replaces_every_variable() {
        let query = r#"rate(x{ns="{{rollout.namespace}}",app="{{ rollout.name }}",v="{{canary.revision}}",s="{{stable.revision}}"}[{{window}}])"#;
        assert_eq!(
            render(query, &vars()).unwrap(),
            r#"rate(x{ns="shop",app="checkout",v="6d4f9b7c8",s="5c8b7a6d4"}[30d])"#
        );
    }

    #[test]
    fn unknown_variables_are_refused() {
        assert_eq!(
            render("{{pod.name}}", &vars()),
            Err(UnknownVariable("pod.name".into()))
        );
        let no_window = TemplateVars {
            window: None,
            ..vars()
        };
        assert!(render("[{{window}}]", &no_window).is_err());
    }

    #[test]
    fn text_without_templates_is_untouched() {
        assert_eq!(
            render("up == 1 {{ unterminated", &vars()).unwrap(),
            "up == 1 {{ unterminated"
        );
    }

    proptest! {
        /// Whatever a name contains, it stays inside the quotes it was placed in.
        #[test]
        fn values_cannot_escape_their_string(name in any::<String>()) {
            let v = TemplateVars { rollout_name: name, ..vars() };
            let rendered = render(r#"x{a="{{rollout.name}}"}"#, &v).unwrap();
            let inner = &rendered[5..rendered.len() - 2];
            // Every quote inside is escaped, and the escaping itself is balanced.
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                prop_assert!(c != '"', "unescaped quote in {rendered}");
                if c == '\\' {
                    let next = chars.next();
                    prop_assert!(matches!(next, Some('\\' | '"' | '\'')), "bad escape in {rendered}");
                }
            }
            prop_assert!(rendered.ends_with("\"}"), "{} lost its closing quote", rendered);
        }
    }
}
