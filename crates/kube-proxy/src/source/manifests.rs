//! Standalone source: a directory of YAML/JSON manifests holding Services, EndpointSlices,
//! Nodes and ServiceCIDRs, so the proxy runs with no cluster at all.
//!
//! Files may hold several documents (`---`) and `kind: List` documents; other kinds are
//! skipped. The directory is polled: a changed, added or removed file re-sends the complete
//! state as `Replace` events (the receiver discards what did not change). A file that fails
//! to parse is reported with its path and position and keeps contributing the objects of its
//! last good version, so one bad edit never removes Services of other files — or its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};

pub use kube_proxy_model::manifest::{parse_manifest, FileObjects};

use super::{EventSender, ObjectEvent, SourceEvent};

/// The merged state of a directory, remembering each file's last good parse.
#[derive(Debug, Default)]
pub struct ManifestDir {
    files: BTreeMap<PathBuf, (FileStamp, FileObjects)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl ManifestDir {
    /// Re-reads files whose size or mtime changed, drops removed ones. Returns whether the
    /// merged object set may have changed.
    pub fn refresh(&mut self, dir: &Path) -> bool {
        let mut present = BTreeMap::new();
        list_manifest_files(dir, &mut present);
        let mut changed = false;
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains_key(*p))
            .cloned()
            .collect();
        for path in removed {
            info!(path = %path.display(), "Manifest file removed");
            self.files.remove(&path);
            changed = true;
        }
        for (path, stamp) in present {
            if self.files.get(&path).is_some_and(|(old, _)| *old == stamp) {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "Cannot read manifest file; keeping its previous objects");
                    continue;
                }
            };
            match parse_manifest(&path, &text) {
                Ok(objects) => {
                    for warning in &objects.warnings {
                        warn!("Skipping invalid object in manifest: {warning}");
                    }
                    debug!(path = %path.display(), services = objects.services.len(), slices = objects.slices.len(), "Read manifest file");
                    self.files.insert(path, (stamp, objects));
                    changed = true;
                }
                Err(error) => {
                    warn!("Cannot parse manifest file, keeping the objects of its last good version: {error}");
                    // Remember the stamp so the same broken content is not re-reported every poll.
                    let previous = self.files.remove(&path).map(|(_, o)| o).unwrap_or_default();
                    self.files.insert(path, (stamp, previous));
                }
            }
        }
        changed
    }

    /// The complete object set: every file's objects, the Node filtered to `node_name`.
    pub fn events(&self, node_name: &str) -> Vec<SourceEvent> {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut nodes = Vec::new();
        let mut service_cidrs = Vec::new();
        for (_, objects) in self.files.values() {
            services.extend(objects.services.iter().cloned());
            service_cidrs.extend(objects.service_cidrs.iter().cloned());
            slices.extend(objects.slices.iter().cloned());
            nodes.extend(
                objects
                    .nodes
                    .iter()
                    .filter(|n| n.metadata.name.as_deref() == Some(node_name))
                    .cloned(),
            );
        }
        nodes.truncate(1);
        vec![
            SourceEvent::Services(ObjectEvent::Replace(services)),
            SourceEvent::EndpointSlices(ObjectEvent::Replace(slices)),
            SourceEvent::Node(ObjectEvent::Replace(nodes)),
            SourceEvent::ServiceCidrs(ObjectEvent::Replace(service_cidrs)),
        ]
    }
}

fn list_manifest_files(dir: &Path, out: &mut BTreeMap<PathBuf, FileStamp>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            list_manifest_files(&path, out);
            continue;
        }
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if hidden || !matches!(ext, "yaml" | "yml" | "json") {
            continue;
        }
        out.insert(
            path,
            FileStamp {
                modified: meta.modified().ok(),
                len: meta.len(),
            },
        );
    }
}

/// Runs the source: an initial read, then a poll every `interval`, until the receiver is gone.
pub async fn run(dir: PathBuf, node_name: String, interval: Duration, tx: EventSender) {
    if !dir.is_dir() {
        warn!(path = %dir.display(), "Manifest directory does not exist (yet); treating it as empty");
    }
    let mut state = ManifestDir::default();
    let mut first = true;
    loop {
        let changed = state.refresh(&dir);
        if changed || first {
            for event in state.events(&node_name) {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            first = false;
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large cluster's manifests (here 5,000 documents) are not refused by the parser's
    /// default budget, while an alias bomb still is.
    #[test]
    fn large_files_parse_and_alias_bombs_do_not() {
        let one = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec:\n  clusterIP: 198.19.0.1\n  ports: [{name: p, port: 80}]\n";
        let text = vec![one; 5000].join("---\n");
        let parsed = parse_manifest(Path::new("big.yaml"), &text).unwrap();
        assert_eq!(parsed.services.len(), 5000);
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (i, prev) in ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .enumerate()
        {
            let name = (b'b' + i as u8) as char;
            bomb.push_str(&format!(
                "{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        assert!(parse_manifest(Path::new("bomb.yaml"), &bomb).is_err());
    }

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 198.19.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: List
items:
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080}]
  endpoints: [{addresses: [198.18.1.5]}]
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web}
---
kind: Node
apiVersion: v1
metadata: {name: node-a}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [198.19.0.0/16, "2001:db8:19::/112"]}
"#;

    #[test]
    fn multi_document_and_lists() {
        let objects = parse_manifest(Path::new("x.yaml"), GOOD).unwrap();
        assert_eq!(objects.services.len(), 1);
        assert_eq!(objects.slices.len(), 1);
        assert_eq!(objects.nodes.len(), 1);
        assert_eq!(objects.service_cidrs.len(), 1);
        assert!(objects.warnings.is_empty(), "{:?}", objects.warnings);
    }

    #[test]
    fn syntax_errors_carry_path_and_position() {
        let err = parse_manifest(
            Path::new("/m/bad.yaml"),
            "kind: Service\nmetadata: {name: [oops\n",
        )
        .unwrap_err();
        assert!(err.starts_with("/m/bad.yaml:"), "{err}");
        assert!(
            err.split(':').nth(1).unwrap().parse::<u32>().is_ok(),
            "line number in {err}"
        );
    }

    #[test]
    fn a_bad_object_skips_only_itself() {
        // `namespace: n` must stay the string "n", not YAML 1.1's boolean false.
        let text = "kind: Service\nmetadata: {name: a, namespace: n}\nspec: {ports: 5}\n---\nkind: Service\nmetadata: {name: b, namespace: n}\nspec: {clusterIP: 198.19.0.2}\n";
        let objects = parse_manifest(Path::new("m.yaml"), text).unwrap();
        assert!(
            objects.warnings[0].contains("spec.ports"),
            "{:?}",
            objects.warnings
        );
        assert_eq!(objects.services.len(), 1, "{:?}", objects.warnings);
    }

    #[test]
    fn broken_edit_keeps_last_good_objects_and_other_files() {
        let dir = std::env::temp_dir().join(format!("kp-manifests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.join("b.json"), r#"{"kind":"Service","apiVersion":"v1","metadata":{"name":"other","namespace":"demo"},"spec":{"clusterIP":"198.19.0.11","ports":[{"port":53,"protocol":"UDP"}]}}"#).unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let mut state = ManifestDir::default();
        assert!(state.refresh(&dir));
        let count = |state: &ManifestDir| match &state.events("node-a")[0] {
            SourceEvent::Services(ObjectEvent::Replace(list)) => list.len(),
            _ => unreachable!(),
        };
        assert_eq!(count(&state), 2);
        assert!(!state.refresh(&dir), "nothing changed");
        std::fs::write(dir.join("a.yaml"), "kind: Service\n  broken: [\n").unwrap();
        state.refresh(&dir);
        assert_eq!(
            count(&state),
            2,
            "the broken file keeps its last good objects"
        );
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        assert!(state.refresh(&dir));
        assert_eq!(count(&state), 1);
        match &state.events("node-b")[2] {
            SourceEvent::Node(ObjectEvent::Replace(nodes)) => assert!(nodes.is_empty()),
            _ => unreachable!(),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
