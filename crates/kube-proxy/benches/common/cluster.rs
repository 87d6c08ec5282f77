//! The benchmarks' cluster: Services and EndpointSlices as a real API server returns them,
//! and list bodies pre-serialized for the fake API server.

use bytes::Bytes;
use serde_json::{json, Value};

pub fn cluster_ip(i: usize) -> String {
    format!("198.19.{}.{}", (i / 250) % 256, 1 + i % 250)
}

pub fn pod_ip(j: usize) -> String {
    format!("198.18.{}.{}", (j / 250) % 256, 1 + j % 250)
}

pub fn cluster_port(i: usize) -> usize {
    // Enough distinct (ip, port) frontends at 50k Services.
    80 + i / 64000
}

/// A Service as a real API server returns it (managedFields included: the proxy must read
/// past them).
pub fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench", "uid": format!("5c1a3e2e-0000-4000-8000-{i:012}"),
            "resourceVersion": format!("{}", 1000 + i), "creationTimestamp": "2026-11-30T10:00:00Z",
            "labels": {"app": format!("svc-{i}"), "team": "bench"},
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-30T10:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:team": {}}},
                    "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                    "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}}]},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip(i), "clusterIPs": [cluster_ip(i)],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None", "selector": {"app": format!("svc-{i}")},
            "ports": [{"name": "http", "port": cluster_port(i), "protocol": "TCP", "targetPort": 8080}]},
        "status": {"loadBalancer": {}}})
}

pub fn slice(i: usize, m: usize) -> Value {
    let endpoints: Vec<Value> = (0..m)
        .map(|k| {
            let j = i * m + k;
            json!({"addresses": [pod_ip(j)], "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": if k == 0 { "node-a" } else { "node-b" },
                "targetRef": {"kind": "Pod", "name": format!("svc-{i}-pod-{k}"), "namespace": "bench", "uid": format!("9d0e-{j:012}")},
                "zone": "zone-a"})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench", "uid": format!("77aa-{i:012}"),
            "resourceVersion": format!("{}", 100000 + i), "generateName": format!("svc-{i}-"),
            "labels": {"kubernetes.io/service-name": format!("svc-{i}"), "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-30T10:00:01Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": format!("svc-{i}"), "uid": format!("5c1a3e2e-0000-4000-8000-{i:012}"), "controller": true, "blockOwnerDeletion": true}]},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

pub fn list_body(kind: &str, items: impl Iterator<Item = Value>) -> Bytes {
    let mut text = format!(
        "{{\"kind\":\"{kind}\",\"apiVersion\":\"v1\",\"metadata\":{{\"resourceVersion\":\"999999\"}},\"items\":["
    );
    for (index, item) in items.enumerate() {
        if index > 0 {
            text.push(',');
        }
        text.push_str(&item.to_string());
    }
    text.push_str("]}");
    Bytes::from(text)
}
