//! Commands of the `mergeflow` binary that need more than a few lines.

pub mod access;
pub mod backup;
pub mod doc;
pub mod events;
pub mod output;
pub mod progress;
pub mod start;
pub mod workflow;

use clap::Args;
use mergeflow::client::Client;

#[derive(Args)]
pub(crate) struct ClientArgs {
    /// API of the node to talk to.
    #[arg(
        long,
        env = "MERGEFLOW_API",
        default_value = "http://127.0.0.1:7700",
        global = true
    )]
    pub(crate) api: String,
    /// API token of the node (its api.token).
    #[arg(
        long,
        env = "MERGEFLOW_API_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub(crate) token: Option<String>,
    /// Print raw JSON responses.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

impl ClientArgs {
    pub(crate) fn client(&self) -> Client {
        Client::new(&self.api).with_token(self.token.as_deref())
    }
}
