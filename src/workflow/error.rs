//! Errors of the workflow engine's management API (its own room, so the
//! run log and the engine can both use it without importing each other).

use super::def::DefError;
use super::run::RunStatus;
use crate::store::StoreError;

/// Errors of the management API.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// No such run.
    #[error("no run {0}")]
    NoRun(u64),
    /// No such workflow.
    #[error("no workflow named {0:?}")]
    NoWorkflow(String),
    /// A workflow defined only by a file, which the API cannot remove.
    #[error(
        "workflow {name:?} is defined by the file {file} on this node, not applied through \
         the API: remove the file from the workflow dir of each node that has it \
         (or stop it everywhere with disable)"
    )]
    DefinedByFile {
        /// The workflow.
        name: String,
        /// Its file.
        file: String,
    },
    /// The run is not in a state the action applies to.
    #[error("run {id} {}; {what}", status.phrase())]
    WrongState {
        /// The run.
        id: u64,
        /// Its status.
        status: RunStatus,
        /// What the action needs.
        what: &'static str,
    },
    /// A definition that does not load.
    #[error(transparent)]
    Def(#[from] DefError),
    /// The run log could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored run record does not decode.
    #[error("run log record {id} does not decode: {what}")]
    Corrupt {
        /// The run.
        id: u64,
        /// The decoder's message.
        what: String,
    },
    /// A definition or flag could not be stored.
    #[error("cannot store the workflow's system doc: {0}")]
    Write(String),
    /// The engine has stopped (the node is shutting down).
    #[error("the workflow engine has stopped")]
    Stopped,
}
