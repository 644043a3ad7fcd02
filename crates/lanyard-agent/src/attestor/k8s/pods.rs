//! The kubelet's pod list (`GET /pods`, a `v1.PodList`) and SPIRE's `k8s` selectors.
//!
//! Only the fields the selectors need are read; every one of them may be missing or `null`
//! (Go's encoder writes a nil list as `null`). A container is found by the ID the runtime
//! reports in its status, a URL such as `containerd://<id>`, `cri-o://<id>` or
//! `docker://<id>`, whose host part is compared with the ID read from the cgroups. A
//! container not started yet has no ID in its status.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Deserializer};

/// Go's encoding writes empty lists and maps as `null` or leaves them out; both mean empty.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// SPIRE requires `items` (an array, or `null` for none).
#[derive(Debug, Deserialize)]
struct PodList {
    #[serde(deserialize_with = "nullable")]
    items: Vec<Pod>,
}

/// A pod, as much of it as the selectors use.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Pod {
    #[serde(default, deserialize_with = "nullable")]
    metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    spec: PodSpec,
    #[serde(default, deserialize_with = "nullable")]
    status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    namespace: String,
    #[serde(default, deserialize_with = "nullable")]
    uid: String,
    #[serde(default, deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct OwnerReference {
    #[serde(default, deserialize_with = "nullable")]
    kind: String,
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    uid: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default, deserialize_with = "nullable")]
    service_account_name: String,
    #[serde(default, deserialize_with = "nullable")]
    node_name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default, deserialize_with = "nullable")]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default, deserialize_with = "nullable")]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default, deserialize_with = "nullable")]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct ContainerStatus {
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    image: String,
    #[serde(default, rename = "imageID", deserialize_with = "nullable")]
    image_id: String,
    #[serde(default, rename = "containerID", deserialize_with = "nullable")]
    container_id: String,
}

impl ContainerStatus {
    /// The runtime's ID of the container: the host part of `containerID`, or nothing while
    /// the container has not started.
    fn runtime_id(&self) -> Option<&str> {
        let (_scheme, rest) = self.container_id.split_once("://")?;
        let id = rest.split(['/', '?', '#']).next().unwrap_or_default();
        (!id.is_empty()).then_some(id)
    }
}

/// The kubelet's pods by UID (pods without one are left out, as SPIRE leaves them out).
#[derive(Debug, Default)]
pub(crate) struct PodIndex {
    pods: HashMap<String, Pod>,
}

impl PodIndex {
    /// Parses the body of the kubelet's `GET /pods`.
    pub(crate) fn parse(body: &[u8]) -> Result<Self, String> {
        let list: PodList = serde_json::from_slice(body)
            .map_err(|e| format!("the kubelet's pod list does not parse: {e}"))?;
        let pods = list
            .items
            .into_iter()
            .filter(|pod| !pod.metadata.uid.is_empty())
            .map(|pod| (pod.metadata.uid.clone(), pod))
            .collect();
        Ok(Self { pods })
    }

    /// How many pods the list holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pods.len()
    }
}

/// What the pod list says about a caller's container.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Its selector values, without the `k8s:` type.
    Found(Vec<String>),
    /// Its pod is not in the list (not yet, or no longer).
    PodAbsent,
    /// No pod in the list has the container in its status (yet).
    ContainerAbsent,
    /// Two pods claim the container.
    Ambiguous,
}

/// Finds the container `container_id` (in pod `pod_uid` when the cgroups named one, else in
/// any pod) and gives SPIRE's selector values for it. With `disable_container_selectors`,
/// a known pod's selectors are given even before the container shows in its status.
pub(crate) fn lookup(
    index: &PodIndex,
    pod_uid: Option<&str>,
    container_id: &str,
    disable_container_selectors: bool,
) -> Lookup {
    let candidates: Vec<&Pod> = match pod_uid {
        Some(uid) => match index.pods.get(uid) {
            Some(pod) => vec![pod],
            None => return Lookup::PodAbsent,
        },
        None => index.pods.values().collect(),
    };
    let mut found = None;
    for pod in candidates {
        let values = match find_container(pod, container_id) {
            Some(status) => {
                let mut values = pod_selector_values(pod);
                if !disable_container_selectors {
                    values.extend(container_selector_values(status));
                }
                values
            }
            None if pod_uid.is_some() && disable_container_selectors => pod_selector_values(pod),
            None => continue,
        };
        if found.is_some() {
            return Lookup::Ambiguous;
        }
        found = Some(values);
    }
    found.map_or(Lookup::ContainerAbsent, Lookup::Found)
}

/// The status of the container with runtime ID `container_id` among the pod's containers,
/// init containers and ephemeral containers.
fn find_container<'a>(pod: &'a Pod, container_id: &str) -> Option<&'a ContainerStatus> {
    let status = &pod.status;
    status
        .container_statuses
        .iter()
        .chain(&status.init_container_statuses)
        .chain(&status.ephemeral_container_statuses)
        .find(|status| status.runtime_id() == Some(container_id))
}

/// Both names of each image: the one the pod asked for (a tag, which several digests may
/// have worn) and the runtime's `imageID` (a digest), empty ones included, as SPIRE does.
fn image_identifiers(statuses: &[ContainerStatus]) -> BTreeSet<&str> {
    statuses
        .iter()
        .flat_map(|status| [status.image.as_str(), status.image_id.as_str()])
        .collect()
}

/// SPIRE's pod selector values (`getSelectorValuesFromPodInfo`).
fn pod_selector_values(pod: &Pod) -> Vec<String> {
    let meta = &pod.metadata;
    let status = &pod.status;
    let mut values = vec![
        format!("sa:{}", pod.spec.service_account_name),
        format!("ns:{}", meta.namespace),
        format!("node-name:{}", pod.spec.node_name),
        format!("pod-uid:{}", meta.uid),
        format!("pod-name:{}", meta.name),
        format!("pod-image-count:{}", status.container_statuses.len()),
        format!(
            "pod-init-image-count:{}",
            status.init_container_statuses.len()
        ),
    ];
    for image in image_identifiers(&status.container_statuses) {
        values.push(format!("pod-image:{image}"));
    }
    for image in image_identifiers(&status.init_container_statuses) {
        values.push(format!("pod-init-image:{image}"));
    }
    for (key, value) in &meta.labels {
        values.push(format!("pod-label:{key}:{value}"));
    }
    for owner in &meta.owner_references {
        values.push(format!("pod-owner:{}:{}", owner.kind, owner.name));
        values.push(format!("pod-owner-uid:{}:{}", owner.kind, owner.uid));
    }
    values
}

/// SPIRE's container selector values (`getSelectorValuesFromWorkloadContainerStatus`).
fn container_selector_values(status: &ContainerStatus) -> Vec<String> {
    let mut values = vec![format!("container-name:{}", status.name)];
    for image in image_identifiers(std::slice::from_ref(status)) {
        values.push(format!("container-image:{image}"));
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_are_the_host_of_the_status_url() {
        let status = |id: &str| ContainerStatus {
            container_id: id.to_owned(),
            ..ContainerStatus::default()
        };
        assert_eq!(status("containerd://abc").runtime_id(), Some("abc"));
        assert_eq!(status("cri-o://abc").runtime_id(), Some("abc"));
        assert_eq!(status("docker://abc/x").runtime_id(), Some("abc"));
        assert_eq!(status("abc").runtime_id(), None);
        assert_eq!(status("containerd://").runtime_id(), None);
        assert_eq!(status("").runtime_id(), None);
    }

    #[test]
    fn nulls_and_missing_fields_are_empty() {
        let index = PodIndex::parse(br#"{"kind":"PodList","items":null}"#).unwrap();
        assert_eq!(index.len(), 0);
        for not_a_pod_list in [&br#"{"kind":"PodList"}"#[..], b"[]", b"{\"items\":{}}", b""] {
            assert!(PodIndex::parse(not_a_pod_list).is_err());
        }
        let index = PodIndex::parse(
            br#"{"items":[
                {"metadata":{"uid":"u1","name":"p","labels":null,"ownerReferences":null},
                 "spec":null,
                 "status":{"containerStatuses":[{"name":"c","containerID":"containerd://c1","image":"i","imageID":null}]}},
                {"metadata":{"name":"no-uid"}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(index.len(), 1, "the pod without a UID is left out");
        let Lookup::Found(values) = lookup(&index, Some("u1"), "c1", false) else {
            panic!("container c1 not found");
        };
        assert!(values.contains(&"sa:".to_owned()), "{values:?}");
        assert!(
            values.contains(&"container-image:".to_owned()),
            "{values:?}"
        );
        assert!(PodIndex::parse(br#"{"items":[{"metadata":{"uid":7}}]}"#).is_err());
    }
}
