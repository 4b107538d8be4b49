//! The automerge-repo sync protocol (issue 20, in progress): the messages
//! JS and browser clients (`@automerge/automerge-repo`), samod and other
//! automerge-repo implementations exchange over a WebSocket, and the
//! mapping between their document URLs and mergeflow's named docs. Not yet
//! served: the endpoint and its connection to the runtime's `Inbox` come
//! next.

pub mod url;
pub mod wire;
