//! Workflows triggered by merges (issue 5): the definition format
//! ([`def`]), expressions ([`expr`]), and the engine that runs them.

pub mod def;
pub mod effect;
pub mod engine;
pub mod expr;
mod log;
pub mod plan;
pub mod run;

pub use engine::{Deleted, Engine, EngineStats, WorkflowError, WorkflowInfo};
pub use run::{Run, RunStatus, StepRun, StepState};
