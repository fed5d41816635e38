//! The policy: which phase a budget is in and which action is in force. Pure.

use crate::api::errorbudget::{BudgetAction, BudgetPhase, BudgetPolicy};

use super::slo::TOLERANCE;

/// The seed policy: freeze promotions at 80% consumed, roll back at 95%.
pub fn default_policy() -> Vec<BudgetPolicy> {
    vec![
        BudgetPolicy {
            when_consumed: 80,
            action: BudgetAction::FreezePromotions,
            rollback_window: None,
        },
        BudgetPolicy {
            when_consumed: 95,
            action: BudgetAction::Rollback,
            rollback_window: None,
        },
    ]
}

fn severity(action: BudgetAction) -> u8 {
    match action {
        BudgetAction::Notify => 1,
        BudgetAction::FreezePromotions => 2,
        BudgetAction::Rollback => 3,
    }
}

/// The most severe action whose threshold `consumed_percent` has reached, and the phase that
/// goes with it. A budget spent (100% or more) is Exhausted whatever the policy says.
pub fn judge(
    consumed_percent: f64,
    policy: &[BudgetPolicy],
) -> (BudgetPhase, Option<BudgetAction>, Option<i32>) {
    let crossed = policy
        .iter()
        .filter(|p| consumed_percent + TOLERANCE >= f64::from(p.when_consumed))
        .max_by_key(|p| (severity(p.action), p.when_consumed));
    let action = crossed.map(|p| p.action);
    let phase = match action {
        _ if consumed_percent + TOLERANCE >= 100.0 => BudgetPhase::Exhausted,
        Some(BudgetAction::Rollback) => BudgetPhase::Exhausted,
        Some(BudgetAction::FreezePromotions) => BudgetPhase::Frozen,
        Some(BudgetAction::Notify) => BudgetPhase::Warning,
        None => BudgetPhase::Healthy,
    };
    (phase, action, crossed.map(|p| p.when_consumed))
}

/// The action in force while the budget cannot be evaluated (Unknown, InsufficientData): a
/// freeze in force stays (an outage never lifts it), a rollback is never started on old
/// figures (it becomes a freeze), and nothing new starts.
pub fn while_blind(previous: Option<BudgetAction>) -> Option<BudgetAction> {
    match previous {
        Some(BudgetAction::FreezePromotions | BudgetAction::Rollback) => {
            Some(BudgetAction::FreezePromotions)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_give_the_phase_and_the_action() {
        let mut policy = default_policy();
        policy.push(BudgetPolicy {
            when_consumed: 50,
            action: BudgetAction::Notify,
            rollback_window: None,
        });
        let table = [
            (0.0, BudgetPhase::Healthy, None),
            (49.9, BudgetPhase::Healthy, None),
            (50.0, BudgetPhase::Warning, Some(BudgetAction::Notify)),
            // Floats: 80% computed as 79.99999999999999 still crosses 80.
            (
                79.999_999_999_99,
                BudgetPhase::Frozen,
                Some(BudgetAction::FreezePromotions),
            ),
            (
                94.0,
                BudgetPhase::Frozen,
                Some(BudgetAction::FreezePromotions),
            ),
            (95.0, BudgetPhase::Exhausted, Some(BudgetAction::Rollback)),
            (250.0, BudgetPhase::Exhausted, Some(BudgetAction::Rollback)),
        ];
        for (consumed, phase, action) in table {
            let (p, a, _) = judge(consumed, &policy);
            assert_eq!((p, a), (phase, action), "{consumed}");
        }
        // Spent with only a notify policy: Exhausted, and the action is still only a notify.
        let notify = [BudgetPolicy {
            when_consumed: 50,
            action: BudgetAction::Notify,
            rollback_window: None,
        }];
        assert_eq!(
            judge(100.0, &notify),
            (BudgetPhase::Exhausted, Some(BudgetAction::Notify), Some(50))
        );
    }

    #[test]
    fn blindness_keeps_a_freeze_and_never_rolls_back() {
        assert_eq!(while_blind(None), None);
        assert_eq!(
            while_blind(Some(BudgetAction::Notify)),
            Some(BudgetAction::Notify)
        );
        assert_eq!(
            while_blind(Some(BudgetAction::FreezePromotions)),
            Some(BudgetAction::FreezePromotions)
        );
        assert_eq!(
            while_blind(Some(BudgetAction::Rollback)),
            Some(BudgetAction::FreezePromotions)
        );
    }
}
