//! Manifest files: the YAML or JSON text of one file (several documents, `kind: List`
//! documents) to the Services, EndpointSlices, Nodes and ServiceCIDRs it holds. Pure, so the
//! standalone source and `explain` share it, and it is fuzzed (`fuzz/`).

use std::path::Path;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde_json::Value;

/// The objects of one file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileObjects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub service_cidrs: Vec<ServiceCIDR>,
    /// Problems that skipped single objects (the rest of the file was used).
    pub warnings: Vec<String>,
}

/// Parses one manifest file's text. `Err` means the file as a whole is unreadable YAML/JSON.
pub fn parse_manifest(path: &Path, text: &str) -> Result<FileObjects, String> {
    // Untyped decoding must not turn `namespace: n` or `name: yes` into booleans (YAML 1.1);
    // Kubernetes' typed decoder keeps them strings, so only YAML 1.2 booleans are booleans.
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    // The parser's default budget (1,024 documents, 250k nodes, 1M events) protects against
    // amplification, but also refuses an honest large cluster's manifests (a `kubectl get -o
    // yaml` of 10k Services is 20k documents). Without aliases a node or event costs at least
    // a byte of input, so limits proportional to the file's size bound the work just as well;
    // the alias and anchor limits, which are what amplifies, stay.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = budget.max_documents.max(text.len() / 8);
    budget.max_nodes = budget.max_nodes.max(text.len() * 2);
    budget.max_events = budget.max_events.max(text.len() * 4);
    options.budget = Some(budget);
    let documents: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
            match e.location() {
                Some(loc) => format!("{}:{}:{}: {e}", path.display(), loc.line(), loc.column()),
                None => format!("{}: {e}", path.display()),
            }
        })?;
    let mut objects = FileObjects::default();
    for (index, document) in documents.into_iter().enumerate() {
        collect(
            path,
            &format!("document {}", index + 1),
            document,
            &mut objects,
        );
    }
    Ok(objects)
}

fn collect(path: &Path, position: &str, document: Value, out: &mut FileObjects) {
    let kind = document
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = document
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let mut skip = |why: String| {
        out.warnings.push(format!(
            "{}: {position} ({kind} {name}): {why}",
            path.display()
        ))
    };
    match kind.as_str() {
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList" | "ServiceCIDRList" => {
            let items = match document.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            };
            for (i, item) in items.into_iter().enumerate() {
                collect(path, &format!("{position} item {}", i + 1), item, out);
            }
        }
        "Service" => match decode::<Service>(document) {
            Ok(obj) => out.services.push(obj),
            Err(e) => skip(e),
        },
        "EndpointSlice" => match decode::<EndpointSlice>(document) {
            Ok(obj) => out.slices.push(obj),
            Err(e) => skip(e),
        },
        "Node" => match decode::<Node>(document) {
            Ok(obj) => out.nodes.push(obj),
            Err(e) => skip(e),
        },
        "ServiceCIDR" => match decode::<ServiceCIDR>(document) {
            Ok(obj) => out.service_cidrs.push(obj),
            Err(e) => skip(e),
        },
        "" => skip("document has no kind".into()),
        _ => {} // Deployments and the like may share the file; they are not ours.
    }
}

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| format!("field {}: {}", e.path(), e.inner()))
}
