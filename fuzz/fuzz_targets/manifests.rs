//! A manifest file of the standalone source (`--manifests`): YAML or JSON, several documents,
//! `kind: List`; what parses is then applied to the model.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(objects) =
        kube_proxy_model::manifest::parse_manifest(std::path::Path::new("f.yaml"), text)
    else {
        return;
    };
    let mut state = kube_proxy_model::ClusterState::new("node-a");
    for service in &objects.services {
        let _ = state.apply_service(service);
    }
    for slice in &objects.slices {
        let _ = state.apply_slice(slice);
    }
    if let Some(node) = objects.nodes.first() {
        let _ = state.set_node(Some(node));
    }
    let _ = state.replace_service_cidrs(objects.service_cidrs.iter());
});
