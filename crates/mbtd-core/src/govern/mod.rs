//! Governing width: per-layer branch diagnostics and the expansion governor's decision rule.
//!
//! Both are pure: the governor actor feeds them numbers and acts on the [`policy::Decision`].

pub mod compare;
pub mod diagnostics;
pub mod float_json;
pub mod policy;

pub use compare::SourceLoss;
pub use diagnostics::{LayerDiagnostics, Stats, layer_diagnostics};
pub use policy::{
    Decision, EvalPoint, Expansion, ExpansionStart, GovernorConfig, GovernorError, GovernorInputs,
    GovernorState, LayerInput, decide,
};
