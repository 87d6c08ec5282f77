//! API-server source: list+watch of Services and EndpointSlices (with upstream's label
//! selector) and of the proxy's own Node (field selector), on `kube::runtime::watcher`.
//!
//! The watcher resumes a broken watch from the last resourceVersion, relists when the server
//! answers `410 Gone`, and backs off exponentially (0.8 s to 30 s) on errors; this module
//! logs each of those and streams every (re)list as `ListStart`, `Listed`..., `ListDone`, so the
//! receiver converts objects one at a time and never applies a half-listed kind.

use std::fmt::Debug;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Config, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

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

/// Runs the three watches until the receiver is gone.
pub async fn run(client: Client, node_name: String, tx: EventSender) {
    let labels = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
    let node_fields = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    tokio::join!(
        watch_kind::<Service>(
            Api::all(client.clone()),
            labels.clone(),
            "Services",
            tx.clone(),
            SourceEvent::Services
        ),
        watch_kind::<EndpointSlice>(
            Api::all(client.clone()),
            labels,
            "EndpointSlices",
            tx.clone(),
            SourceEvent::EndpointSlices
        ),
        watch_kind::<Node>(Api::all(client), node_fields, "Node", tx, SourceEvent::Node),
    );
}

async fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    tx: EventSender,
    wrap: fn(ObjectEvent<K>) -> SourceEvent,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let stream = watcher::watcher(api, config)
        .default_backoff()
        // managedFields are large and unused: drop them before they are buffered.
        .modify(|obj| obj.managed_fields_mut().clear());
    let mut stream = std::pin::pin!(stream);
    let mut listed = 0usize;
    let mut lists = 0u64;
    let mut failing = false;
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(Event::Init) => {
                listed = 0;
                if lists == 0 {
                    info!(kind = what, "Listing objects");
                } else {
                    info!(
                        kind = what,
                        "Relisting objects (the watch could not be resumed, e.g. 410 Gone)"
                    );
                }
                ObjectEvent::ListStart
            }
            Ok(Event::InitApply(obj)) => {
                listed += 1;
                ObjectEvent::Listed(obj)
            }
            Ok(Event::InitDone) => {
                lists += 1;
                info!(
                    kind = what,
                    count = listed,
                    "Listed objects; watching for changes"
                );
                ObjectEvent::ListDone
            }
            Ok(Event::Apply(obj)) => ObjectEvent::Apply(obj),
            Ok(Event::Delete(obj)) => ObjectEvent::Delete(obj),
            Err(error) => {
                warn!(kind = what, error = %error, "List/watch failed; retrying with backoff");
                failing = true;
                continue;
            }
        };
        if failing {
            info!(kind = what, "List/watch recovered");
            failing = false;
        }
        if tx.send(wrap(event)).await.is_err() {
            return;
        }
    }
}
