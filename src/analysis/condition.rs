//! Success and failure conditions: CEL expressions over `result`.

use std::sync::Arc;

use cel::{Context, Program, Value};

/// What a provider measured.
#[derive(Clone, Debug, PartialEq)]
pub enum MeasuredValue {
    /// A scalar, or a vector with exactly one sample.
    Number(f64),
    /// A vector with several samples.
    List(Vec<f64>),
}

/// The number a plain comparison condition compares the result with (`result < 0.05`,
/// `result[0] >= 99.5`, `0.05 > result`), for dashboards; `None` for anything else.
pub fn threshold(condition: &str) -> Option<f64> {
    let c = condition.trim();
    for op in ["<=", ">=", "==", "<", ">"] {
        if let Some((left, right)) = c.split_once(op) {
            let (left, right) = (left.trim(), right.trim());
            let is_result = |s: &str| s == "result" || s == "result[0]";
            return if is_result(left) {
                right.parse().ok()
            } else if is_result(right) {
                left.parse().ok()
            } else {
                None
            };
        }
    }
    None
}

impl MeasuredValue {
    /// True when any number is NaN: such a result says nothing about the release.
    pub fn has_nan(&self) -> bool {
        match self {
            Self::Number(n) => n.is_nan(),
            Self::List(items) => items.iter().any(|n| n.is_nan()),
        }
    }

    /// True when any number is +Inf or -Inf: judged only by a condition that asks `isInf`.
    pub fn has_infinity(&self) -> bool {
        match self {
            Self::Number(n) => n.is_infinite(),
            Self::List(items) => items.iter().any(|n| n.is_infinite()),
        }
    }

    fn to_cel(&self) -> Value {
        match self {
            Self::Number(n) => Value::Float(*n),
            Self::List(items) => {
                Value::List(Arc::new(items.iter().map(|n| Value::Float(*n)).collect()))
            }
        }
    }
}

impl std::fmt::Display for MeasuredValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{}", format_number(*n)),
            Self::List(items) => {
                let parts: Vec<String> = items.iter().map(|n| format_number(*n)).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

fn format_number(n: f64) -> String {
    if n.is_finite() && n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{n:.0}")
    } else if n.is_finite() {
        format!("{:.6}", n)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        n.to_string()
    }
}

/// A compiled condition.
#[derive(Debug)]
pub struct Condition {
    source: String,
    program: Program,
}

/// A condition that cannot be used: it does not parse, or it did not give a boolean.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConditionError {
    #[error("condition {expression:?} does not parse: {message}")]
    Parse { expression: String, message: String },
    #[error("condition {expression:?} failed on result {value}: {message}")]
    Evaluate {
        expression: String,
        value: String,
        message: String,
    },
    #[error("condition {expression:?} gave {got} instead of true or false")]
    NotBoolean { expression: String, got: String },
}

/// How deep a condition's brackets may nest. cel's parser descends a dozen calls for each
/// bracket: 50 unclosed `(` overflowed the 8 MiB stack of a debug build (found by the fuzz
/// target), and the operator compiles conditions on threads of 2 MiB. A real condition nests
/// two or three deep.
const MAX_NESTING: usize = 8;

/// The deepest nesting of brackets in `source` (those inside string literals too: a
/// condition has no reason to hold many).
fn nesting(source: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for c in source.chars() {
        match c {
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

impl Condition {
    pub fn compile(source: &str) -> Result<Self, ConditionError> {
        let deepest = nesting(source);
        if deepest > MAX_NESTING {
            return Err(ConditionError::Parse {
                expression: source.to_string(),
                message: format!("brackets nest {deepest} deep; at most {MAX_NESTING} are allowed"),
            });
        }
        let program = Program::compile(source).map_err(|e| ConditionError::Parse {
            expression: source.to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            source: source.to_string(),
            program,
        })
    }

    /// Evaluates the condition with `result` bound to `value`.
    pub fn evaluate(&self, value: &MeasuredValue) -> Result<bool, ConditionError> {
        let mut context = Context::default();
        context.add_variable_from_value("result", value.to_cel());
        context.add_function("isNaN", |x: f64| x.is_nan());
        context.add_function("isInf", |x: f64| x.is_infinite());
        let outcome = self
            .program
            .execute(&context)
            .map_err(|e| ConditionError::Evaluate {
                expression: self.source.clone(),
                value: value.to_string(),
                message: e.to_string(),
            })?;
        match outcome {
            Value::Bool(b) => Ok(b),
            other => Err(ConditionError::NotBoolean {
                expression: self.source.clone(),
                got: format!("{other:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn brackets_nested_too_deep_are_refused_before_the_parser_sees_them() {
        let nested = |depth: usize| format!("{}result{} > 0", "(".repeat(depth), ")".repeat(depth));
        assert!(super::Condition::compile(&nested(super::MAX_NESTING)).is_ok());
        for refused in [
            nested(super::MAX_NESTING + 1),
            "(".repeat(68),
            "([{".repeat(22),
        ] {
            let error = super::Condition::compile(&refused).unwrap_err().to_string();
            assert!(error.contains("at most 8 are allowed"), "{error}");
        }
    }

    #[test]
    fn a_plain_comparison_gives_its_threshold() {
        for (condition, want) in [
            ("result < 0.05", Some(0.05)),
            ("result[0] >= 99.5", Some(99.5)),
            ("0.2 > result", Some(0.2)),
            ("result < 0.05 && result > 0", None),
            ("isNaN(result)", None),
            ("result.all(r, r < 1)", None),
        ] {
            assert_eq!(super::threshold(condition), want, "{condition}");
        }
    }

    use super::*;

    fn eval(source: &str, value: MeasuredValue) -> Result<bool, ConditionError> {
        Condition::compile(source)?.evaluate(&value)
    }

    #[test]
    fn scalar_conditions() {
        use MeasuredValue::Number;
        let cases = [
            ("result < 0.01", 0.005, true),
            ("result < 0.01", 0.3, false),
            ("result < 500", 120.0, true), // an integer literal against a float result
            ("result >= 0.99 && result <= 1.0", 0.995, true),
            ("isNaN(result)", f64::NAN, true),
            ("isInf(result)", f64::INFINITY, true),
            ("!isNaN(result) && result < 1.0", 0.5, true),
        ];
        for (source, value, expected) in cases {
            assert_eq!(
                eval(source, Number(value)),
                Ok(expected),
                "{source} with {value}"
            );
        }
    }

    #[test]
    fn list_conditions() {
        let list = MeasuredValue::List(vec![0.001, 0.002, 0.5]);
        assert_eq!(eval("result.all(x, x < 0.01)", list.clone()), Ok(false));
        assert_eq!(eval("result.exists(x, x > 0.1)", list.clone()), Ok(true));
        assert_eq!(eval("size(result) == 3", list), Ok(true));
    }

    #[test]
    fn bad_conditions_are_errors_not_verdicts() {
        assert!(matches!(
            eval("result <", MeasuredValue::Number(1.0)),
            Err(ConditionError::Parse { .. })
        ));
        assert!(matches!(
            eval("result + 1.0", MeasuredValue::Number(1.0)),
            Err(ConditionError::NotBoolean { .. })
        ));
        assert!(matches!(
            eval("result.all(x, x < 1.0)", MeasuredValue::Number(1.0)),
            Err(ConditionError::Evaluate { .. })
        ));
    }

    #[test]
    fn nan_is_detected_in_lists() {
        assert!(MeasuredValue::List(vec![1.0, f64::NAN]).has_nan());
        assert!(!MeasuredValue::Number(1.0).has_nan());
    }

    #[test]
    fn values_print_compactly() {
        assert_eq!(MeasuredValue::Number(0.0123).to_string(), "0.0123");
        assert_eq!(MeasuredValue::Number(500.0).to_string(), "500");
        assert_eq!(MeasuredValue::List(vec![1.0, 0.5]).to_string(), "[1, 0.5]");
    }
}
