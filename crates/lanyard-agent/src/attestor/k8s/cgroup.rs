//! The pod UID and container ID of a process, from `/proc/<pid>/cgroup`, by SPIRE's rules.
//!
//! Each line is `hierarchy-ID:controllers:path`; the path itself may hold colons (containerd
//! under systemd writes `…pod<uid>.slice:cri-containerd:<id>`). In each path the container ID
//! is the last 64-hex-digit word, looked for from the last segment backwards; the pod UID is
//! the first `pod<uuid>` word before it (the systemd driver writes its dashes as
//! underscores). Paths are relative to the reader's cgroup namespace, so a path may start
//! with `/..`, and nothing above the pod need be visible. The file is written by the kernel,
//! so a workload cannot forge it (unlike its mount table, which SPIRE falls back to and this
//! module does not read).

/// Length of a container ID: 32 bytes in hex, for every runtime Kubernetes uses.
pub(crate) const CONTAINER_ID_LEN: usize = 64;

/// Where a process runs, by its cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    /// The pod's UID, with dashes, when the cgroup path names one (CRI-O under some
    /// setups, and namespaced paths of the agent's own pod, name only the container).
    pub(crate) pod_uid: Option<String>,
    /// The container's ID, 64 hex digits.
    pub(crate) container_id: String,
}

/// Why a cgroup file could not be read as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CgroupError {
    /// A line is not `hierarchy-ID:controllers:path`.
    Malformed,
    /// Two lines name different pods.
    PodConflict(String, String),
    /// Two lines name different containers.
    ContainerConflict(String, String),
}

impl std::fmt::Display for CgroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed => f.write_str("a line is not hierarchy-ID:controllers:path"),
            Self::PodConflict(a, b) => write!(f, "multiple pod UIDs found ({a:?}, {b:?})"),
            Self::ContainerConflict(a, b) => {
                write!(f, "multiple container IDs found ({a:?}, {b:?})")
            }
        }
    }
}

/// The pod and container of the process whose cgroup file is `text`; `None` for a process
/// in no container (a host process, or CRI-O's `conmon`).
///
/// Lines are combined as SPIRE combines them: a line naming a pod overrides lines that name
/// only a container (kind on Docker adds the node container's own ID on a line of its
/// own), and once a pod is known such lines are ignored; two pods, or two containers of
/// the same standing, are a conflict and no answer. Lines naming no container count for
/// nothing.
pub(crate) fn placement(text: &str) -> Result<Option<Placement>, CgroupError> {
    let mut found: Option<Placement> = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_hierarchy), Some(_controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(CgroupError::Malformed);
        };
        let Some(candidate) = placement_in_path(path) else {
            continue;
        };
        match &found {
            None => found = Some(candidate),
            Some(current) => match (&current.pod_uid, &candidate.pod_uid) {
                (Some(_), None) => {}
                (None, Some(_)) => found = Some(candidate),
                (Some(a), Some(b)) if a != b => {
                    return Err(CgroupError::PodConflict(a.clone(), b.clone()));
                }
                _ if current.container_id != candidate.container_id => {
                    return Err(CgroupError::ContainerConflict(
                        current.container_id.clone(),
                        candidate.container_id.clone(),
                    ));
                }
                _ => {}
            },
        }
    }
    Ok(found)
}

/// The container ID, and the pod UID when there is one, in one cgroup path.
///
/// Segments are read from the last one backwards and the walk stops at an empty segment
/// (the root, or `//`), as SPIRE's walk does.
fn placement_in_path(path: &str) -> Option<Placement> {
    let mut segments = path.rsplit('/').take_while(|segment| !segment.is_empty());
    let mut before_id = None;
    for segment in segments.by_ref() {
        // CRI-O's container monitor runs beside the container, in a scope named after it.
        if segment.starts_with("crio-conmon-") {
            return None;
        }
        if let Some(start) = find_container_id(segment) {
            let container_id = segment.get(start..start + CONTAINER_ID_LEN)?.to_owned();
            before_id = Some((container_id, segment.get(..start).unwrap_or_default()));
            break;
        }
    }
    let (container_id, rest_of_segment) = before_id?;
    let pod_uid = std::iter::once(rest_of_segment)
        .filter(|rest| !rest.is_empty())
        .chain(segments)
        .find_map(find_pod_uid)
        .map(|uid| uid.replace('_', "-"));
    Some(Placement {
        pod_uid,
        container_id,
    })
}

/// A byte of a word in the sense of a regular expression's `\b` (ASCII `[0-9A-Za-z_]`).
fn is_word(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

/// Whether a span of word bytes stands as a whole word: neither the byte at `before` (the one
/// before the span, if any) nor the byte at `after` (the one after it, if any) is a word byte.
fn is_boundary(bytes: &[u8], before: Option<usize>, after: usize) -> bool {
    let before_is_word = before
        .and_then(|i| bytes.get(i))
        .is_some_and(|b| is_word(*b));
    let after_is_word = bytes.get(after).is_some_and(|b| is_word(*b));
    !before_is_word && !after_is_word
}

/// The start of the first whole word of exactly 64 hex digits in `segment`.
fn find_container_id(segment: &str) -> Option<usize> {
    let bytes = segment.as_bytes();
    (0..bytes.len()).find(|&start| {
        bytes
            .get(start..start + CONTAINER_ID_LEN)
            .is_some_and(|run| run.iter().all(u8::is_ascii_hexdigit))
            && is_boundary(bytes, start.checked_sub(1), start + CONTAINER_ID_LEN)
    })
}

/// The UUID of the first whole word `pod<uuid>` in `segment`, the groups of the UUID
/// separated by `-` or `_`.
fn find_pod_uid(segment: &str) -> Option<&str> {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    const UUID_LEN: usize = 36;
    let bytes = segment.as_bytes();
    (0..bytes.len()).find_map(|start| {
        let uuid_start = start + 3;
        let uuid_end = uuid_start + UUID_LEN;
        if bytes.get(start..uuid_start) != Some(b"pod".as_slice())
            || !is_boundary(bytes, start.checked_sub(1), uuid_end)
        {
            return None;
        }
        let uuid = bytes.get(uuid_start..uuid_end)?;
        let mut at = 0;
        for (i, len) in GROUPS.iter().enumerate() {
            if i > 0 {
                if !matches!(uuid.get(at), Some(b'-' | b'_')) {
                    return None;
                }
                at += 1;
            }
            if !uuid.get(at..at + len)?.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            at += len;
        }
        segment.get(uuid_start..uuid_end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "6f1e2d3c-4b5a-4789-9abc-def012345678";
    const ID: &str = "3c9a7e1f0b2d4c6e8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";

    fn one(path: &str) -> Option<Placement> {
        placement(&format!("0::{path}\n")).unwrap()
    }

    fn in_pod(pod: &str, id: &str) -> Option<Placement> {
        Some(Placement {
            pod_uid: Some(pod.to_owned()),
            container_id: id.to_owned(),
        })
    }

    #[test]
    fn every_layout_gives_the_pod_and_the_container() {
        let underscored = POD.replace('-', "_");
        for path in [
            format!("/kubepods/burstable/pod{POD}/{ID}"),
            format!("/kubepods/pod{POD}/{ID}"),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod{underscored}.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod{underscored}.slice/cri-containerd-{ID}.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod{underscored}.slice/crio-{ID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod{underscored}.slice/docker-{ID}.scope"
            ),
            format!("/kubepods-besteffort-pod{underscored}.slice:cri-containerd:{ID}"),
            format!(
                "/system.slice/containerd.service/\
                 kubepods-burstable-pod{underscored}.slice:cri-containerd:{ID}"
            ),
            format!("/../../kubepods-besteffort-pod{underscored}.slice/cri-containerd-{ID}.scope"),
            format!("/../pod{POD}/{ID}"),
            // kind: the node is itself a Docker container.
            format!(
                "/docker/{}/kubepods/besteffort/pod{POD}/{ID}",
                "ab".repeat(32)
            ),
        ] {
            assert_eq!(one(&path), in_pod(POD, ID), "{path}");
        }
    }

    #[test]
    fn a_container_without_a_pod_is_named_alone() {
        for path in [
            format!("/../crio-{ID}.scope"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
        ] {
            assert_eq!(
                one(&path),
                Some(Placement {
                    pod_uid: None,
                    container_id: ID.to_owned(),
                }),
                "{path}"
            );
        }
    }

    #[test]
    fn no_container_means_no_placement() {
        for path in [
            "/".to_owned(),
            "/user.slice/user-1000.slice/session-2.scope".to_owned(),
            "/system.slice/kubelet.service".to_owned(),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                POD.replace('-', "_")
            ),
            // The runtime's monitor is not the container.
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-conmon-{ID}.scope",
                POD.replace('-', "_")
            ),
            // 63 and 65 hex digits are not an ID, nor a hex run inside a longer word.
            format!("/docker-{}.scope", &ID[1..]),
            format!("/docker-{ID}a.scope"),
            format!("/x{ID}"),
            // A root in the middle ends the walk, as in SPIRE.
            format!("/pod{POD}/{ID}/"),
        ] {
            assert_eq!(one(&path), None, "{path}");
        }
    }

    #[test]
    fn pod_words_must_be_whole_and_well_formed() {
        // "kubepods" holds "pod" inside a word: not a pod UID.
        assert_eq!(
            one(&format!("/kubepods{POD}/{ID}")).and_then(|p| p.pod_uid),
            None
        );
        // Mixed separators are accepted, as SPIRE's expression accepts them.
        let mixed = "6f1e2d3c_4b5a-4789_9abc-def012345678";
        assert_eq!(
            one(&format!("/pod{mixed}/{ID}")),
            in_pod("6f1e2d3c-4b5a-4789-9abc-def012345678", ID)
        );
        // A missing separator is not a UUID.
        let squashed = POD.replacen('-', "", 1);
        assert_eq!(
            one(&format!("/pod{squashed}/{ID}")).and_then(|p| p.pod_uid),
            None
        );
        // The pod is searched before the container only.
        assert_eq!(
            one(&format!("/{ID}/pod{POD}")).and_then(|p| p.pod_uid),
            None
        );
    }

    #[test]
    fn lines_combine_as_in_spire() {
        let host_container = "cd".repeat(32);
        // kind on Docker with the unified hierarchy: the node container's own line is ignored.
        let kind = format!(
            "1:cpuset:/docker/{host_container}/kubepods/besteffort/pod{POD}/{ID}\n\
             0::/docker/{host_container}/system.slice/containerd.service\n"
        );
        assert_eq!(placement(&kind), Ok(in_pod(POD, ID)));
        let reversed = format!(
            "1:cpuset:/docker/{host_container}/system.slice/containerd.service\n\
             0::/docker/{host_container}/kubepods/besteffort/pod{POD}/{ID}\n"
        );
        assert_eq!(placement(&reversed), Ok(in_pod(POD, ID)));
        let other_pod = "00000000-1111-2222-3333-444444444444";
        assert_eq!(
            placement(&format!(
                "2:cpu:/kubepods/pod{POD}/{ID}\n1:pids:/kubepods/pod{other_pod}/{ID}\n"
            )),
            Err(CgroupError::PodConflict(POD.into(), other_pod.into()))
        );
        assert_eq!(
            placement(&format!(
                "2:cpu:/kubepods/pod{POD}/{ID}\n1:pids:/kubepods/pod{POD}/{host_container}\n"
            )),
            Err(CgroupError::ContainerConflict(
                ID.into(),
                host_container.clone()
            ))
        );
        assert_eq!(
            placement(&format!(
                "1:cpu:/docker/{ID}\n0::/docker/{host_container}\n"
            )),
            Err(CgroupError::ContainerConflict(ID.into(), host_container))
        );
    }

    #[test]
    fn a_line_without_three_fields_is_malformed() {
        assert_eq!(
            placement("0::/\nnot a cgroup line\n"),
            Err(CgroupError::Malformed)
        );
        assert_eq!(placement("12:pids\n"), Err(CgroupError::Malformed));
        assert_eq!(placement(""), Ok(None));
    }
}
