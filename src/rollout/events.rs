//! The reasons of the Events the Rollout controller records: stable, typed, one place.

/// Why a Rollout Event was recorded. The text (`as_str`) is the Event's `reason`, which
/// people and alerts match on: never rename one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The first revision went straight to stable.
    Deployed,
    ReleaseStarted,
    ReleaseSuperseded,
    ReleaseCancelled,
    StepCompleted,
    Paused,
    /// Paused because an analysis was inconclusive or erred: a person decides.
    AnalysisInconclusive,
    Resumed,
    PromotedFull,
    Promoted,
    AbortedByUser,
    AnalysisFailed,
    AnalysisRestarted,
    Retried,
    /// Blue-green: the revision kept for an instant rollback was scaled down.
    PreviousScaledDown,
    /// An ErrorBudget freezes promotions: a new revision is held on stable, or steps hold.
    FrozenByErrorBudget,
    /// A person released a revision despite the freeze.
    FreezeOverridden,
    /// An ErrorBudget's rollback threshold aborted the release in flight.
    AbortedByErrorBudget,
    /// An ErrorBudget's rollback threshold took a recently completed release back to the
    /// revision before it.
    RolledBackByErrorBudget,
    /// A new release waits on stable until its Pipeline stage admits it.
    HeldByPipeline,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Deployed => "Deployed",
            Reason::ReleaseStarted => "ReleaseStarted",
            Reason::ReleaseSuperseded => "ReleaseSuperseded",
            Reason::ReleaseCancelled => "ReleaseCancelled",
            Reason::StepCompleted => "StepCompleted",
            Reason::Paused => "Paused",
            Reason::AnalysisInconclusive => "AnalysisInconclusive",
            Reason::Resumed => "Resumed",
            Reason::PromotedFull => "PromotedFull",
            Reason::Promoted => "Promoted",
            Reason::AbortedByUser => "AbortedByUser",
            Reason::AnalysisFailed => "AnalysisFailed",
            Reason::AnalysisRestarted => "AnalysisRestarted",
            Reason::Retried => "Retried",
            Reason::PreviousScaledDown => "PreviousScaledDown",
            Reason::FrozenByErrorBudget => "FrozenByErrorBudget",
            Reason::FreezeOverridden => "FreezeOverridden",
            Reason::AbortedByErrorBudget => "AbortedByErrorBudget",
            Reason::RolledBackByErrorBudget => "RolledBackByErrorBudget",
            Reason::HeldByPipeline => "HeldByPipeline",
        }
    }
}

impl Reason {
    /// Whether the Event records an ErrorBudget policy acting (it is recorded on the budget
    /// too).
    pub fn is_budget_action(self) -> bool {
        matches!(
            self,
            Reason::FrozenByErrorBudget
                | Reason::FreezeOverridden
                | Reason::AbortedByErrorBudget
                | Reason::RolledBackByErrorBudget
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
