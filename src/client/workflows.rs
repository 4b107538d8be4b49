//! The client's workflow, run and access calls.

use serde_json::Value as Json;

use super::{Client, ClientError, encode_id};

impl Client {
    /// `GET /v1/workflows`
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn workflows(&self) -> Result<Vec<Json>, ClientError> {
        self.send(self.http.get(format!("{}/v1/workflows", self.base)))
            .await
    }

    /// `GET /v1/workflows/{name}`
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn workflow(&self, name: &str) -> Result<Json, ClientError> {
        let url = format!("{}/v1/workflows/{}", self.base, encode_id(name));
        self.send(self.http.get(url)).await
    }

    /// `GET /v1/access` (`apply` None) or `PUT /v1/access` with an access
    /// file's text: the rules the node holds, or apply new ones.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn access(&self, apply: Option<String>) -> Result<Json, ClientError> {
        let url = format!("{}/v1/access", self.base);
        let req = match apply {
            None => self.http.get(url),
            Some(text) => self
                .http
                .put(url)
                .header("content-type", "application/toml")
                .body(text),
        };
        self.send(req).await
    }

    /// `POST /v1/workflows`: stores a definition that syncs to every node.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn apply_workflow(&self, text: String) -> Result<Json, ClientError> {
        let url = format!("{}/v1/workflows", self.base);
        self.send(
            self.http
                .post(url)
                .header("content-type", "application/toml")
                .body(text),
        )
        .await
    }

    /// `DELETE /v1/workflows/{name}`: removes an applied definition on
    /// every node.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn delete_workflow(&self, name: &str) -> Result<Json, ClientError> {
        let url = format!("{}/v1/workflows/{}", self.base, encode_id(name));
        self.send(self.http.delete(url)).await
    }

    /// `POST /v1/workflows/{name}/enable` or `.../disable`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn set_workflow_enabled(&self, name: &str, on: bool) -> Result<Json, ClientError> {
        let action = if on { "enable" } else { "disable" };
        let url = format!("{}/v1/workflows/{}/{action}", self.base, encode_id(name));
        self.send(self.http.post(url)).await
    }

    /// `GET /v1/runs`, newest first.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn runs(
        &self,
        workflow: Option<&str>,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::workflow::Run>, ClientError> {
        let mut query = vec![("limit", limit.to_string())];
        query.extend(workflow.map(|w| ("workflow", w.to_string())));
        query.extend(status.map(|s| ("status", s.to_string())));
        let url = format!("{}/v1/runs", self.base);
        self.send(self.http.get(url).query(&query)).await
    }

    /// `GET /v1/runs/{id}`
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn run(&self, id: u64) -> Result<crate::workflow::Run, ClientError> {
        self.send(self.http.get(format!("{}/v1/runs/{id}", self.base)))
            .await
    }

    /// `POST /v1/runs/{id}/retry` (`retry`) or `.../skip`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn run_action(
        &self,
        id: u64,
        action: &str,
    ) -> Result<crate::workflow::Run, ClientError> {
        let url = format!("{}/v1/runs/{id}/{action}", self.base);
        self.send(self.http.post(url)).await
    }
}
