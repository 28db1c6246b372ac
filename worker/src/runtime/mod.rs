//! The container lifecycle on containerd: deploy, exit detection, undeploy, adoption after a
//! restart and the `jobs/resources` samples (worker-protocol §5.2, §6, §3.6). Pure cores
//! (`spec`, `instance`, `cgroups`, `metrics`, `logs`) decide; `lifecycle` talks to containerd.
//! It does not pull images (the [`Puller`] seam) nor build networks (the [`Network`] seam).

pub mod cgroups;
pub mod image;
pub mod instance;
pub mod lifecycle;
pub mod logs;
pub mod metrics;
pub mod spec;

pub use lifecycle::{Driver, Error, Runtime, RuntimeConfig};

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// One instance status change for `nodes/<id>/job` (worker-protocol §3.5): the cluster
/// session's boundary type itself, so the runtime adapter forwards it as is.
pub use crate::runtime_link::StatusChange;

/// The parts of an image config (`config` in the OCI image config JSON) a container needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    #[serde(rename = "Env", deserialize_with = "null_default")]
    pub env: Vec<String>,
    #[serde(rename = "Entrypoint", deserialize_with = "null_default")]
    pub entrypoint: Vec<String>,
    #[serde(rename = "Cmd", deserialize_with = "null_default")]
    pub cmd: Vec<String>,
    #[serde(rename = "WorkingDir", deserialize_with = "null_default")]
    pub working_dir: String,
    #[serde(rename = "User", deserialize_with = "null_default")]
    pub user: String,
}

/// Docker writes `null` for empty lists and strings.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + serde::Deserialize<'de>,
{
    use serde::Deserialize;
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An image ready for a container: its run config and the snapshot its rootfs starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PulledImage {
    /// The containerd image name (recorded on the container).
    pub name: String,
    pub config: ImageConfig,
    /// Top chain id of the layers: the committed snapshot that is the rootfs's parent,
    /// unpacked for the runtime's snapshotter.
    pub chain_id: String,
}

/// A boxed future, as the seams return them (no async traits in our MSRV).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// The image seam: called when the image is not in containerd's namespace, or not unpacked
/// for our snapshotter. It must leave the image unpacked and say how to run it. The error is
/// the FAILED report's `status_detail`, so it should name the image and the fix.
pub trait Puller {
    /// `platform` is the job's `platform` field (`linux/arm64`), None for the host's.
    fn pull<'a>(
        &'a self,
        reference: &'a str,
        platform: Option<&'a str>,
    ) -> BoxFuture<'a, Result<PulledImage, String>>;
}

impl<F, Fut> Puller for F
where
    F: Fn(&str, Option<&str>) -> Fut,
    Fut: Future<Output = Result<PulledImage, String>> + 'static,
{
    fn pull<'a>(
        &'a self,
        reference: &'a str,
        platform: Option<&'a str>,
    ) -> BoxFuture<'a, Result<PulledImage, String>> {
        Box::pin(self(reference, platform))
    }
}

/// A puller for builds and tests without registry access: every missing image fails clearly.
pub struct NoPuller;

impl Puller for NoPuller {
    fn pull<'a>(
        &'a self,
        reference: &'a str,
        _: Option<&'a str>,
    ) -> BoxFuture<'a, Result<PulledImage, String>> {
        let msg = format!(
            "image {reference} is not in containerd and this worker cannot pull images yet: pull it with `ctr -n <namespace> images pull {reference}`"
        );
        Box::pin(async move { Err(msg) })
    }
}

/// The overlay seam (netstack). `attach` runs before the container is created and may return
/// a network namespace for it to join (spec §5.2 of containerd-client: the netns must exist
/// with its interfaces configured); None gives the container a fresh netns with loopback
/// only, as upstream does without the overlay. `detach` runs during teardown.
pub trait Network {
    fn attach<'a>(
        &'a self,
        container_id: &'a str,
        job: &'a crate::protocol::DeployCommand,
    ) -> BoxFuture<'a, Result<Option<PathBuf>, String>>;
    fn detach<'a>(&'a self, container_id: &'a str) -> BoxFuture<'a, ()>;
}

/// Networking off (`OAK_NETWORK=off`, or no overlay in this build).
pub struct NoNetwork;

impl Network for NoNetwork {
    fn attach<'a>(
        &'a self,
        _: &'a str,
        _: &'a crate::protocol::DeployCommand,
    ) -> BoxFuture<'a, Result<Option<PathBuf>, String>> {
        Box::pin(async { Ok(None) })
    }
    fn detach<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}
