//! Narrowing a PromQL query to one revision: every selector of the query's syntax tree gets
//! the matcher `label="value"` (replacing one the query had for that label), so an
//! ErrorBudget's service-wide indicator measures the canary's traffic alone.

use lrpar::{Lexeme, Lexer, NonStreamingLexer};
use promql_parser::label::{MatchOp, Matcher, Matchers};
use promql_parser::parser::token::{T_ADD, T_COLON, T_LEFT_BRACKET, T_NUMBER, T_OFFSET, T_SUB};
use promql_parser::parser::{self, Expr, VectorSelector};
use std::time::Duration;

/// The query with `label="value"` on every vector selector, printed back as PromQL.
pub fn narrow(query: &str, label: &str, value: &str) -> Result<String, String> {
    // The parser prints matcher values as they are, unescaped: a quote or a backslash in the
    // value would print a different (or broken) query. Revisions never hold one; refuse it.
    if value.contains(['"', '\\', '\n', '\r']) {
        return Err(format!(
            "cannot narrow to {label}={value:?}: the value holds a quote, backslash or line break"
        ));
    }
    let mut expr = parse(query).map_err(|e| format!("cannot parse {query:?}: {e}"))?;
    let mut selectors = 0;
    visit(&mut expr, &mut |selector| {
        pin(&mut selector.matchers, label, value);
        selectors += 1;
    });
    if selectors == 0 {
        return Err(format!("{query:?} selects no series to narrow"));
    }
    // The printer does not always give back what the parser accepts (found by fuzzing: `x[0]`
    // prints as `x[0s]`, which does not parse): hand out only a query that parses.
    let narrowed = expr.to_string();
    parse(&narrowed).map_err(|e| {
        format!("cannot narrow {query:?}: the narrowed query {narrowed:?} does not parse: {e}")
    })?;
    Ok(narrowed)
}

/// `promql_parser::parser::parse`, minus its one known panic: a plain number used as a
/// duration (`x[inf]`, `x[1e400]`, `x offset nan`) goes to `Duration::from_secs_f64`, which
/// panics when the number is not a finite, non-negative count of seconds that fits (found by
/// fuzzing, promql-parser 0.11.1). A user's query must never take the operator down: such a
/// number is refused here, from the parser's own tokens, before the parser sees it.
pub fn parse(query: &str) -> Result<Expr, String> {
    let lexer = parser::lexer(query)?;
    let mut before: [Option<u16>; 2] = [None, None];
    for lexeme in lexer.iter().flatten() {
        let token = lexeme.tok_id();
        let in_duration_position = matches!(
            before,
            [_, Some(T_LEFT_BRACKET | T_COLON | T_OFFSET)] | [Some(T_OFFSET), Some(T_ADD | T_SUB)]
        );
        if token == T_NUMBER && in_duration_position {
            let text = lexer.span_str(lexeme.span());
            let seconds = promql_parser::util::parse_str_radix(text)?;
            if Duration::try_from_secs_f64(seconds).is_err() {
                return Err(format!(
                    "{text} is not a duration: a number of seconds must be finite, not negative and below 2^64"
                ));
            }
        }
        before = [before[1], Some(token)];
    }
    parser::parse(query)
}

/// The metric names a query selects (for checking dashboards against what is exported).
pub fn metric_names(query: &str) -> Result<std::collections::BTreeSet<String>, String> {
    let mut expr = parse(query).map_err(|e| format!("cannot parse {query:?}: {e}"))?;
    let mut names = std::collections::BTreeSet::new();
    visit(&mut expr, &mut |selector| {
        if let Some(name) = &selector.name {
            names.insert(name.clone());
        }
        for m in &selector.matchers.matchers {
            if m.name == "__name__" && m.op == MatchOp::Equal {
                names.insert(m.value.clone());
            }
        }
    });
    Ok(names)
}

fn pin(matchers: &mut Matchers, label: &str, value: &str) {
    let fresh = || Matcher::new(MatchOp::Equal, label, value);
    matchers.matchers.retain(|m| m.name != label);
    matchers.matchers.push(fresh());
    for alternative in &mut matchers.or_matchers {
        alternative.retain(|m| m.name != label);
        alternative.push(fresh());
    }
}

/// Calls `f` on every vector selector of the tree (those inside range selectors too).
fn visit(expr: &mut Expr, f: &mut impl FnMut(&mut VectorSelector)) {
    match expr {
        Expr::Aggregate(e) => {
            visit(&mut e.expr, f);
            if let Some(param) = e.param.as_mut() {
                visit(param, f);
            }
        }
        Expr::Unary(e) => visit(&mut e.expr, f),
        Expr::Binary(e) => {
            visit(&mut e.lhs, f);
            visit(&mut e.rhs, f);
        }
        Expr::Paren(e) => visit(&mut e.expr, f),
        Expr::Subquery(e) => visit(&mut e.expr, f),
        Expr::VectorSelector(selector) => f(selector),
        Expr::MatrixSelector(m) => f(&mut m.vs),
        Expr::Call(call) => {
            for arg in &mut call.args.args {
                visit(arg, f);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_the_printer_cannot_quote_are_refused() {
        // Found by fuzzing: printed unescaped, this value ended the string and the query.
        for value in ["x\"}) or vector(1) #", "a\\b", "a\nb"] {
            assert!(
                narrow("sum(rate(x[1m]))", "revision", value).is_err(),
                "{value:?}"
            );
        }
        assert!(narrow("sum(rate(x[1m]))", "revision", "5d8f7c").is_ok());
        // Also found by fuzzing: accepted, but printed as a query that does not parse.
        assert!(narrow("l[0]", "revision", "web").is_err());
    }

    #[test]
    fn numbers_that_are_no_duration_are_refused_not_a_panic() {
        // Found by fuzzing: the first made promql-parser panic; the others are its kin.
        for query in [
            "l[666666666666666666666666666666666][]",
            "rate(x[1e400])",
            "x offset nan",
            "x offset -inf",
            "x offset +Inf",
            "max_over_time(x[5m:1e30])",
        ] {
            let refused = narrow(query, "revision", "web").expect_err(query);
            assert!(refused.contains("is not a duration"), "{query}: {refused}");
        }
        // The lexer refuses a name inside brackets itself.
        assert!(narrow("rate(x[inf])", "revision", "web").is_err());
        // Numbers elsewhere, and plain-number durations that fit, are left alone.
        for query in [
            "x > inf",
            "rate(x[300])",
            "x offset 60",
            "x[5m:30]",
            "rate(x[300]) > inf",
        ] {
            assert!(narrow(query, "revision", "web").is_ok(), "{query}");
        }
        // The parser refuses an `@` time out of range itself, without panicking.
        let refused = narrow("x @ 1e400 > 1", "revision", "web").unwrap_err();
        assert!(!refused.contains("is not a duration"), "{refused}");
    }

    fn selectors_of(query: &str) -> Vec<String> {
        let mut expr = parser::parse(query).unwrap();
        let mut found = Vec::new();
        visit(&mut expr, &mut |s| {
            let mut pairs: Vec<String> = s
                .matchers
                .matchers
                .iter()
                .filter(|m| m.name != "__name__")
                .map(|m| format!("{}={}", m.name, m.value))
                .collect();
            pairs.sort();
            found.push(pairs.join(","));
        });
        found
    }

    #[test]
    fn every_selector_is_narrowed_and_nothing_else_changes() {
        let query = r#"sum(rate(istio_requests_total{destination_workload="checkout",response_code=~"5.."}[5m])) / sum(rate(istio_requests_total{destination_workload="checkout"}[5m]))"#;
        let narrowed = narrow(query, "destination_canonical_revision", "bbb").unwrap();
        assert_eq!(
            selectors_of(&narrowed),
            vec![
                "destination_canonical_revision=bbb,destination_workload=checkout,response_code=5..",
                "destination_canonical_revision=bbb,destination_workload=checkout",
            ]
        );
        // The same shape otherwise: removing the matcher gives back the original selectors.
        assert!(narrowed.contains("sum(rate("), "{narrowed}");
        assert!(narrowed.contains("[5m]"), "{narrowed}");
    }

    #[test]
    fn a_matcher_for_the_label_is_replaced_not_duplicated() {
        let narrowed = narrow(
            r#"sum(rate(x{destination_canonical_revision="old"}[1m]))"#,
            "destination_canonical_revision",
            "new",
        )
        .unwrap();
        assert_eq!(
            selectors_of(&narrowed),
            vec!["destination_canonical_revision=new"]
        );
    }

    #[test]
    fn functions_subqueries_and_offsets_are_walked() {
        let narrowed = narrow(
            "max_over_time(rate(x[1m])[5m:1m]) + on() vector(0) or absent(y offset 1m)",
            "rev",
            "r1",
        )
        .unwrap();
        assert_eq!(selectors_of(&narrowed), vec!["rev=r1", "rev=r1"]);
    }

    #[test]
    fn nothing_to_narrow_or_no_parse_is_an_error() {
        assert!(narrow("vector(1)", "rev", "r1").is_err());
        assert!(narrow("sum(rate(x[1m]", "rev", "r1").is_err());
    }
}
