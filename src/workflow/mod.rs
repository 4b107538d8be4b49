//! Workflows triggered by merges (issue 5): the definition format
//! ([`def`]), expressions ([`expr`]), and the engine that runs them.

pub mod def;
pub mod effect;
pub mod engine;
mod error;
pub mod expr;
mod log;
pub mod plan;
pub mod run;

pub use engine::{Deleted, Engine, EngineStats, WorkflowInfo};
pub use error::WorkflowError;
pub use run::{Run, RunStatus, StepRun, StepState};
