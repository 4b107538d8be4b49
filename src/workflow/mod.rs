//! Workflows triggered by merges (issue 5): the definition format
//! ([`def`]), expressions ([`expr`]), and the engine that runs them.

mod catalog;
mod data_steps;
pub mod def;
pub mod effect;
mod effect_run;
pub mod engine;
mod error;
pub mod expr;
mod lifecycle;
mod log;
mod ownership;
pub mod plan;
pub mod request;
pub mod run;
mod runner;
mod shared;
mod step;
mod trigger;

pub use engine::{Deleted, Engine, EngineStats, WorkflowInfo};
pub use error::WorkflowError;
pub use run::{Run, RunStatus, StepRun, StepState};
