//! API-server source: list+watch of Services and EndpointSlices (with upstream's label
//! selector), of the proxy's own Node (field selector) and of the cluster's ServiceCIDRs.
//!
//! Lists are cheap for the API server and for us, as upstream's informers make them:
//! * `resourceVersion=0` without paging, so the API server answers from its watch cache
//!   instead of reading etcd page by page;
//! * the response is split into items while it streams in ([`ListSplitter`]) and each item is
//!   decoded and handed to the event loop at once, so the body is never held whole and the
//!   event loop converts objects while the rest is still arriving;
//! * each kind is listed by its own task, so Services and EndpointSlices decode in parallel.
//!
//! After a list the kind is watched from the list's resourceVersion (with bookmarks). A watch
//! that ends is resumed from the last version seen; `410 Gone` (the version is too old) means
//! a relist, streamed as `ListStart`, `Listed`..., `ListDone`, so the receiver never applies a
//! half-listed kind and deletes what the relist no longer has. Errors back off exponentially
//! from 0.8 s to 30 s. Each of these is logged.
//!
//! A backoff must not hold the proxy back once an API server that was unreachable answers
//! again (after an outage the watches would otherwise wait up to 30 s more, then meet
//! `410 Expired` and relist). So while a kind waits after a *connection* failure, one probe
//! shared by all kinds ([`Reachability`]) asks `/readyz` every 0.3-0.6 s (jittered, so nodes do
//! not probe in step); a refused connection costs the server nothing. The first answer of
//! any HTTP status ends every such wait at once. Failures the server itself answered (5xx,
//! 429, ...) keep the plain backoff: there the server is up and asks to be left alone.

use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::{Client, Config, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{debug, info, trace, warn};

use super::list_splitter::ListSplitter;
use super::{EventSender, ObjectEvent, SourceEvent, PROXY_LABEL_SELECTOR};

/// How to reach the API server, from `--kubeconfig`, `--master` and `clientConnection`.
#[derive(Clone, Debug, Default)]
pub struct ClientSettings {
    pub kubeconfig: Option<String>,
    pub master: Option<String>,
    pub qps: f32,
    pub burst: i32,
    pub content_type: String,
}

/// Builds a client as upstream does: the kubeconfig file if given (its server overridden by
/// `--master`), else `--master` alone, else the in-cluster service account.
pub async fn client(settings: &ClientSettings) -> anyhow::Result<Client> {
    use anyhow::Context;
    let mut config = match (&settings.kubeconfig, &settings.master) {
        (Some(path), _) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("failed to read kubeconfig {path}"))?;
            Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("failed to load kubeconfig {path}"))?
        }
        (None, Some(master)) => Config::new(
            master
                .parse()
                .with_context(|| format!("--master {master:?} is not a URL"))?,
        ),
        (None, None) => match Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => {
                info!(error = %in_cluster, "Not running in a cluster; trying $KUBECONFIG and ~/.kube/config");
                Config::infer()
                    .await
                    .context("no --kubeconfig, no --master and no in-cluster service account")?
            }
        },
    };
    if let (Some(_), Some(master)) = (&settings.kubeconfig, &settings.master) {
        config.cluster_url = master
            .parse()
            .with_context(|| format!("--master {master:?} is not a URL"))?;
    }
    debug!(
        server = %config.cluster_url,
        qps = settings.qps,
        burst = settings.burst,
        content_type = %settings.content_type,
        "API client configured (requests are JSON; a watch-only client needs no QPS limiter)"
    );
    Client::try_from(config).context("failed to build the API client")
}

/// Runs the four list+watch loops until the receiver is gone.
pub async fn run(client: Client, node_name: String, tx: EventSender) {
    let reachability = Reachability::new(client.clone());
    let labels = Selection {
        labels: Some(PROXY_LABEL_SELECTOR.into()),
        fields: None,
    };
    let tasks = [
        tokio::spawn(list_watch::<Service>(
            client.clone(),
            labels.clone(),
            "Services",
            reachability.clone(),
            tx.clone(),
            SourceEvent::Services,
        )),
        tokio::spawn(list_watch::<EndpointSlice>(
            client.clone(),
            labels,
            "EndpointSlices",
            reachability.clone(),
            tx.clone(),
            SourceEvent::EndpointSlices,
        )),
        tokio::spawn(list_watch::<Node>(
            client.clone(),
            Selection {
                labels: None,
                fields: Some(format!("metadata.name={node_name}")),
            },
            "Node",
            reachability.clone(),
            tx.clone(),
            SourceEvent::Node,
        )),
        tokio::spawn(list_watch::<ServiceCIDR>(
            client,
            Selection::default(),
            "ServiceCIDRs",
            reachability.clone(),
            tx,
            SourceEvent::ServiceCidrs,
        )),
    ];
    for task in tasks {
        let _ = task.await;
    }
}

/// Which objects of a kind are watched.
#[derive(Clone, Debug, Default)]
struct Selection {
    labels: Option<String>,
    fields: Option<String>,
}

/// Why a list or watch failed.
#[derive(Debug, thiserror::Error)]
enum ListWatchError {
    #[error("{0}")]
    Request(#[from] kube::Error),
    #[error("the API server answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("reading the response failed: {0}")]
    Body(String),
    #[error("{0}")]
    Malformed(#[from] super::list_splitter::MalformedList),
    /// The receiver is gone: stop quietly.
    #[error("the event loop has stopped")]
    Closed,
}

impl ListWatchError {
    /// The API server was not reached or the connection broke: no HTTP answer came.
    fn is_unreachable(&self) -> bool {
        match self {
            ListWatchError::Request(kube::Error::Api(_)) => false,
            ListWatchError::Request(_) | ListWatchError::Body(_) => true,
            ListWatchError::Status { .. }
            | ListWatchError::Malformed(_)
            | ListWatchError::Closed => false,
        }
    }

    /// `410 Gone`/`Expired`: the requested version is no longer in the server's history.
    fn is_gone(&self) -> bool {
        match self {
            ListWatchError::Request(kube::Error::Api(status)) => status.code == 410,
            ListWatchError::Status { status, .. } => *status == 410,
            _ => false,
        }
    }
}

/// Exponential backoff, as kube's and client-go's reflectors: 0.8 s doubling to 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(800);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Backoff { next: Self::FIRST }
    }
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
    /// Waits out the backoff; after a connection failure the wait also ends as soon as the
    /// API server answers again.
    async fn wait(&mut self, error: &ListWatchError, reachability: &Arc<Reachability>) {
        let sleep = tokio::time::sleep(self.next);
        self.next = (self.next * 2).min(Self::MAX);
        if error.is_unreachable() {
            tokio::select! {
                _ = sleep => {}
                _ = reachability.answering() => {
                    info!("The API server answers again; resuming at once instead of waiting out the backoff");
                    self.reset();
                }
            }
        } else {
            sleep.await;
        }
    }
}

/// One probe of the API server shared by every kind that waits after a connection failure.
pub(crate) struct Reachability {
    client: Client,
    /// Bumped each time a probe is answered.
    answered: tokio::sync::watch::Sender<u64>,
    probing: AtomicBool,
}

impl Reachability {
    /// A probe's interval is `PROBE_EVERY` plus up to as much again of jitter.
    const PROBE_EVERY: Duration = Duration::from_millis(300);
    const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

    pub(crate) fn new(client: Client) -> Arc<Self> {
        Arc::new(Reachability {
            client,
            answered: tokio::sync::watch::channel(0).0,
            probing: AtomicBool::new(false),
        })
    }

    /// Returns once the API server answers a probe (started now, or already running).
    async fn answering(self: &Arc<Self>) {
        let mut answered = self.answered.subscribe();
        answered.borrow_and_update();
        if !self.probing.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move { this.probe_until_answered().await });
        }
        let _ = answered.changed().await;
    }

    async fn probe_until_answered(&self) {
        let mut probes = 0u64;
        loop {
            tokio::time::sleep(Self::PROBE_EVERY + jitter(Self::PROBE_EVERY)).await;
            probes += 1;
            let request = hyper::Request::get("/readyz")
                .body(Vec::new())
                .expect("a static request");
            match tokio::time::timeout(
                Self::PROBE_TIMEOUT,
                self.client.send(request.map(kube::client::Body::from)),
            )
            .await
            {
                Ok(Ok(response)) => {
                    debug!(status = %response.status(), probes, "The API server answered a probe");
                    self.probing.store(false, Ordering::Release);
                    self.answered.send_modify(|n| *n += 1);
                    return;
                }
                Ok(Err(error)) => {
                    trace!(error = %error, probes, "The API server is still unreachable")
                }
                Err(_) => trace!(probes, "A probe of the API server timed out"),
            }
            if self.answered.receiver_count() == 0 {
                // Nobody waits any more (each wait's backoff ran out first).
                self.probing.store(false, Ordering::Release);
                return;
            }
        }
    }
}

/// A random duration below `max`: each `RandomState` is keyed afresh from the process's
/// random seed, so the hash of nothing is a random number (no random crate needed).
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let fraction = (hasher.finish() % 1000) as u32;
    max * fraction / 1000
}

async fn list_watch<K>(
    client: Client,
    selection: Selection,
    what: &'static str,
    reachability: Arc<Reachability>,
    tx: EventSender,
    wrap: fn(ObjectEvent<K>) -> SourceEvent,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut backoff = Backoff::new();
    let mut lists = 0u64;
    let mut failing = false;
    'list: loop {
        if lists == 0 {
            info!(kind = what, "Listing objects");
        } else {
            info!(
                kind = what,
                "Relisting objects (the watch could not be resumed, e.g. 410 Gone)"
            );
        }
        let started = Instant::now();
        let mut version = match list::<K>(&client, &selection, &tx, wrap).await {
            Ok((version, count, bytes)) => {
                lists += 1;
                info!(
                    kind = what,
                    count,
                    bytes,
                    elapsed = ?started.elapsed(),
                    "Listed objects; watching for changes"
                );
                if failing {
                    info!(kind = what, "List/watch recovered");
                    failing = false;
                }
                backoff.reset();
                version
            }
            Err(ListWatchError::Closed) => return,
            Err(ListWatchError::Status { status: 404, .. }) if what == "ServiceCIDRs" => {
                if !failing {
                    info!("ServiceCIDRs are not served by this API server (networking.k8s.io/v1, Kubernetes 1.33 and later); traffic to unallocated ClusterIPs is not dropped");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_secs(300)).await;
                continue 'list;
            }
            Err(error) => {
                warn!(kind = what, error = %error, retry_in = ?backoff.next, "List failed; retrying with backoff");
                failing = true;
                backoff.wait(&error, &reachability).await;
                continue 'list;
            }
        };
        // Watch from the list's version until it must be relisted.
        loop {
            match watch::<K>(&client, &selection, &mut version, &tx, wrap).await {
                Ok(WatchEnd::TimedOut) => {
                    debug!(kind = what, version = %version, "Watch ended; resuming");
                    backoff.reset();
                }
                Ok(WatchEnd::Gone) => continue 'list,
                // The same answered to the watch request itself: relist at once, not after a
                // backoff (and never retry the watch from a version the server no longer has).
                Err(error) if error.is_gone() => continue 'list,
                Err(ListWatchError::Closed) => return,
                Err(error) => {
                    warn!(kind = what, error = %error, retry_in = ?backoff.next, "Watch failed; resuming with backoff");
                    backoff.wait(&error, &reachability).await;
                }
            }
        }
    }
}

/// Lists every object of the kind (from the API server's watch cache), streaming them to the
/// receiver; returns the list's resourceVersion, the object count and the body size.
async fn list<K>(
    client: &Client,
    selection: &Selection,
    tx: &EventSender,
    wrap: fn(ObjectEvent<K>) -> SourceEvent,
) -> Result<(String, usize, usize), ListWatchError>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Send + 'static,
{
    let params = ListParams {
        label_selector: selection.labels.clone(),
        field_selector: selection.fields.clone(),
        // "0": any version the watch cache has, unpaged, as upstream's informers list.
        resource_version: Some("0".into()),
        ..Default::default()
    };
    let request = kube::core::Request::new(K::url_path(&(), None))
        .list(&params)
        .map_err(kube::Error::BuildRequest)?;
    let response = client.send(request.map(kube::client::Body::from)).await?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(ListWatchError::Status {
            status: status.as_u16(),
            message: status_message(&bytes),
        });
    }
    if tx.send(wrap(ObjectEvent::ListStart)).await.is_err() {
        return Err(ListWatchError::Closed);
    }
    let mut splitter = ListSplitter::new();
    let mut bytes = 0usize;
    let mut decoded: Vec<K> = Vec::new();
    let mut undecodable = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ListWatchError::Body(e.to_string()))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        bytes += chunk.len();
        splitter.feed(&chunk, |item| match serde_json::from_slice::<K>(item) {
            Ok(object) => decoded.push(object),
            Err(e) => {
                undecodable += 1;
                warn!(kind = %K::kind(&()), error = %e, "Skipping an object that does not decode");
            }
        })?;
        for mut object in decoded.drain(..) {
            // managedFields are large and unused.
            object.managed_fields_mut().clear();
            if tx.send(wrap(ObjectEvent::Listed(object))).await.is_err() {
                return Err(ListWatchError::Closed);
            }
        }
    }
    let (version, count) = splitter.finish()?;
    if tx.send(wrap(ObjectEvent::ListDone)).await.is_err() {
        return Err(ListWatchError::Closed);
    }
    Ok((version, count - undecodable, bytes))
}

enum WatchEnd {
    /// The server closed the watch (its timeout): resume from the last version.
    TimedOut,
    /// `410 Gone`: the version is no longer in the server's history; relist.
    Gone,
}

/// Watches from `version`, streaming changes to the receiver and advancing `version`.
async fn watch<K>(
    client: &Client,
    selection: &Selection,
    version: &mut String,
    tx: &EventSender,
    wrap: fn(ObjectEvent<K>) -> SourceEvent,
) -> Result<WatchEnd, ListWatchError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut params = WatchParams::default().timeout(290);
    params.label_selector = selection.labels.clone();
    params.field_selector = selection.fields.clone();
    let api: Api<K> = Api::all(client.clone());
    let stream = api.watch(&params, version).await?;
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let event = match event? {
            WatchEvent::Added(object) | WatchEvent::Modified(object) => ObjectEvent::Apply(object),
            WatchEvent::Deleted(object) => ObjectEvent::Delete(object),
            WatchEvent::Bookmark(bookmark) => {
                *version = bookmark.metadata.resource_version;
                continue;
            }
            WatchEvent::Error(status) if status.code == 410 => return Ok(WatchEnd::Gone),
            WatchEvent::Error(status) => {
                return Err(ListWatchError::Status {
                    status: status.code,
                    message: status.message,
                })
            }
        };
        let mut event = event;
        if let ObjectEvent::Apply(object) | ObjectEvent::Delete(object) = &mut event {
            // managedFields are large and unused.
            object.managed_fields_mut().clear();
            if let Some(v) = object.resource_version() {
                *version = v;
            }
        }
        if tx.send(wrap(event)).await.is_err() {
            return Err(ListWatchError::Closed);
        }
    }
    Ok(WatchEnd::TimedOut)
}

/// The message of a `Status` body, or the body itself.
fn status_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Status {
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Status>(body) {
        Ok(status) if !status.message.is_empty() => status.message,
        _ => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}
