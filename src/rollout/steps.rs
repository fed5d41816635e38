//! Canary steps in a form the planner can match on.

use std::fmt;
use std::time::Duration;

use crate::api::rollout::{CanaryStep, SetCanaryScale};

/// One step, with exactly one meaning.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    SetWeight(i32),
    /// `None`: until promoted.
    Pause(Option<Duration>),
    Analysis,
    SetCanaryScale(CanaryScale),
}

/// How big the canary is, independently of its weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CanaryScale {
    Replicas(i32),
    Weight(i32),
    MatchTrafficWeight,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::SetWeight(w) => write!(f, "setWeight {w}"),
            Step::Pause(Some(d)) => write!(f, "pause {}s", d.as_secs()),
            Step::Pause(None) => write!(f, "pause until promoted"),
            Step::Analysis => write!(f, "analysis"),
            Step::SetCanaryScale(CanaryScale::Replicas(n)) => write!(f, "setCanaryScale {n} pods"),
            Step::SetCanaryScale(CanaryScale::Weight(w)) => write!(f, "setCanaryScale {w}%"),
            Step::SetCanaryScale(CanaryScale::MatchTrafficWeight) => {
                write!(f, "setCanaryScale matchTrafficWeight")
            }
        }
    }
}

fn convert(step: &CanaryStep) -> Option<Step> {
    if let Some(w) = step.set_weight {
        return Some(Step::SetWeight(w.clamp(0, 100)));
    }
    if let Some(pause) = &step.pause {
        return Some(Step::Pause(pause.duration.as_ref().map(|d| d.as_std())));
    }
    if step.analysis.is_some() {
        return Some(Step::Analysis);
    }
    step.set_canary_scale.as_ref().map(|s: &SetCanaryScale| {
        Step::SetCanaryScale(match (s.replicas, s.weight) {
            (Some(n), _) => CanaryScale::Replicas(n.max(0)),
            (None, Some(w)) => CanaryScale::Weight(w.clamp(0, 100)),
            (None, None) => CanaryScale::MatchTrafficWeight,
        })
    })
}

/// The steps to run: the user's, or the default 10 -> 25 -> 50 -> 75 with a minute each.
pub fn effective(steps: &[CanaryStep]) -> Vec<Step> {
    if steps.is_empty() {
        let minute = Step::Pause(Some(Duration::from_secs(60)));
        return [10, 25, 50, 75]
            .into_iter()
            .flat_map(|w| [Step::SetWeight(w), minute.clone()])
            .collect();
    }
    steps.iter().filter_map(convert).collect()
}

/// The weight set by the steps before `index`.
pub fn weight_at(steps: &[Step], index: usize) -> i32 {
    steps[..index.min(steps.len())]
        .iter()
        .rev()
        .find_map(|s| {
            if let Step::SetWeight(w) = s {
                Some(*w)
            } else {
                None
            }
        })
        .unwrap_or(0)
}

/// Canary pods while at step `index` (the step itself included).
pub fn canary_replicas(steps: &[Step], index: usize, replicas: i32) -> i32 {
    let upto = &steps[..(index + 1).min(steps.len())];
    let weight = weight_at(upto, upto.len());
    let scale = upto.iter().rev().find_map(|s| {
        if let Step::SetCanaryScale(c) = s {
            Some(c)
        } else {
            None
        }
    });
    match scale {
        Some(CanaryScale::Replicas(n)) => (*n).min(replicas),
        Some(CanaryScale::Weight(w)) => canary_replicas_for_weight(replicas, *w),
        Some(CanaryScale::MatchTrafficWeight) | None => {
            canary_replicas_for_weight(replicas, weight)
        }
    }
}

/// Canary pods for a traffic weight: rounded up, at least one when the weight is above zero.
pub fn canary_replicas_for_weight(replicas: i32, weight: i32) -> i32 {
    if weight <= 0 || replicas <= 0 {
        return 0;
    }
    let scaled = (i64::from(replicas) * i64::from(weight.min(100)) + 99) / 100;
    (scaled as i32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_steps() {
        let steps = effective(&[]);
        assert_eq!(steps.len(), 8);
        assert_eq!(steps[0], Step::SetWeight(10));
        assert_eq!(steps[7], Step::Pause(Some(Duration::from_secs(60))));
    }

    #[test]
    fn weights_and_replicas_follow_the_steps() {
        let steps = vec![
            Step::SetWeight(10),
            Step::Pause(None),
            Step::SetCanaryScale(CanaryScale::Replicas(3)),
            Step::SetWeight(50),
            Step::SetCanaryScale(CanaryScale::MatchTrafficWeight),
        ];
        assert_eq!(weight_at(&steps, 0), 0);
        assert_eq!(weight_at(&steps, 2), 10);
        assert_eq!(canary_replicas(&steps, 0, 5), 1, "10% of 5 rounds up to 1");
        assert_eq!(canary_replicas(&steps, 2, 5), 3);
        assert_eq!(
            canary_replicas(&steps, 3, 5),
            3,
            "the explicit scale holds across weights"
        );
        assert_eq!(canary_replicas(&steps, 4, 5), 3, "50% of 5 rounds up to 3");
        assert_eq!(canary_replicas(&steps, 4, 10), 5);
    }
}
