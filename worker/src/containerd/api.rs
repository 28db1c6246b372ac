//! containerd API messages, written by hand for exactly the calls we make.
//!
//! Field numbers are from containerd 1.6's `.proto` files and were checked on the wire
//! (spec §4). Requests borrow their inputs and only encode; responses own their data and only
//! decode, skipping unknown fields (1.7 added some). Message names follow the protos where that
//! helps grepping; we do not model anything we do not send or read.

use super::pb::{self, Error, Field};

pub type Labels = Vec<(String, String)>;

/// Full method paths (spec §4.3).
pub mod path {
    pub const VERSION: &str = "/containerd.services.version.v1.Version/Version";
    pub const LEASES_CREATE: &str = "/containerd.services.leases.v1.Leases/Create";
    pub const LEASES_DELETE: &str = "/containerd.services.leases.v1.Leases/Delete";
    pub const CONTENT_WRITE: &str = "/containerd.services.content.v1.Content/Write";
    pub const CONTENT_INFO: &str = "/containerd.services.content.v1.Content/Info";
    pub const CONTENT_READ: &str = "/containerd.services.content.v1.Content/Read";
    pub const CONTENT_UPDATE: &str = "/containerd.services.content.v1.Content/Update";
    pub const SNAPSHOTS_PREPARE: &str = "/containerd.services.snapshots.v1.Snapshots/Prepare";
    pub const SNAPSHOTS_MOUNTS: &str = "/containerd.services.snapshots.v1.Snapshots/Mounts";
    pub const SNAPSHOTS_COMMIT: &str = "/containerd.services.snapshots.v1.Snapshots/Commit";
    pub const SNAPSHOTS_REMOVE: &str = "/containerd.services.snapshots.v1.Snapshots/Remove";
    pub const SNAPSHOTS_STAT: &str = "/containerd.services.snapshots.v1.Snapshots/Stat";
    pub const SNAPSHOTS_USAGE: &str = "/containerd.services.snapshots.v1.Snapshots/Usage";
    pub const DIFF_APPLY: &str = "/containerd.services.diff.v1.Diff/Apply";
    pub const IMAGES_GET: &str = "/containerd.services.images.v1.Images/Get";
    pub const IMAGES_CREATE: &str = "/containerd.services.images.v1.Images/Create";
    pub const IMAGES_UPDATE: &str = "/containerd.services.images.v1.Images/Update";
    pub const CONTAINERS_CREATE: &str = "/containerd.services.containers.v1.Containers/Create";
    pub const CONTAINERS_DELETE: &str = "/containerd.services.containers.v1.Containers/Delete";
    pub const CONTAINERS_LIST: &str = "/containerd.services.containers.v1.Containers/List";
    pub const TASKS_CREATE: &str = "/containerd.services.tasks.v1.Tasks/Create";
    pub const TASKS_START: &str = "/containerd.services.tasks.v1.Tasks/Start";
    pub const TASKS_WAIT: &str = "/containerd.services.tasks.v1.Tasks/Wait";
    pub const TASKS_KILL: &str = "/containerd.services.tasks.v1.Tasks/Kill";
    pub const TASKS_DELETE: &str = "/containerd.services.tasks.v1.Tasks/Delete";
    pub const TASKS_GET: &str = "/containerd.services.tasks.v1.Tasks/Get";
    pub const TASKS_LIST: &str = "/containerd.services.tasks.v1.Tasks/List";
    pub const EVENTS_SUBSCRIBE: &str = "/containerd.services.events.v1.Events/Subscribe";
}

/// `Any.type_url` of the OCI runtime spec; its value is the spec as **JSON** (spec §3.3, §8).
pub const RUNTIME_SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
pub const RUNC_V2: &str = "io.containerd.runc.v2";
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";

pub trait Encode {
    fn encode(&self, out: &mut Vec<u8>);
}

pub trait Decode: Sized {
    fn decode(buf: &[u8]) -> Result<Self, Error>;
}

/// `google.protobuf.Empty`, both ways.
impl Encode for () {
    fn encode(&self, _: &mut Vec<u8>) {}
}

impl Decode for () {
    fn decode(_: &[u8]) -> Result<(), Error> {
        Ok(())
    }
}

fn labels(out: &mut Vec<u8>, field: u32, l: &[(&str, &str)]) {
    for (k, v) in l {
        pb::map_entry(out, field, k, v);
    }
}

fn label(f: &Field<'_>, into: &mut Labels) -> Result<(), Error> {
    into.push(pb::map_entry_decode(f.bytes()?)?);
    Ok(())
}

/// Decodes an embedded message field.
fn sub<T: Decode>(f: &Field<'_>) -> Result<T, Error> {
    T::decode(f.bytes()?)
}

// ------------------------------------------------------------------ common types

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: i32,
}

impl Decode for Timestamp {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut t = Timestamp::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => t.seconds = f.i64()?,
                2 => t.nanos = f.i32()?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(t)
    }
}

/// `containerd.types.Descriptor` (OCI descriptor; no field 4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    pub annotations: Labels,
}

impl Encode for Descriptor {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, &self.media_type);
        pb::string(out, 2, &self.digest);
        pb::int64(out, 3, self.size);
        for (k, v) in &self.annotations {
            pb::map_entry(out, 5, k, v);
        }
    }
}

impl Decode for Descriptor {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut d = Descriptor::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => d.media_type = f.string()?,
                2 => d.digest = f.string()?,
                3 => d.size = f.i64()?,
                5 => label(&f, &mut d.annotations)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(d)
    }
}

/// `containerd.types.Mount`, as returned by Prepare/Mounts and passed to Apply and Tasks/Create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
}

impl Encode for Mount {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, &self.kind);
        pb::string(out, 2, &self.source);
        pb::string(out, 3, &self.target);
        for o in &self.options {
            pb::repeated_string(out, 4, o);
        }
    }
}

impl Decode for Mount {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut m = Mount::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => m.kind = f.string()?,
                2 => m.source = f.string()?,
                3 => m.target = f.string()?,
                4 => m.options.push(f.string()?),
                _ => {}
            }
            Ok(())
        })?;
        Ok(m)
    }
}

/// Responses that are just `repeated Mount mounts = 1` (Prepare, View, Mounts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts(pub Vec<Mount>);

impl Decode for Mounts {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut v = Vec::new();
        pb::for_each(buf, |f| {
            if f.num == 1 {
                v.push(sub(&f)?);
            }
            Ok(())
        })?;
        Ok(Mounts(v))
    }
}

// ------------------------------------------------------------------ version

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Version {
    pub version: String,
    pub revision: String,
}

impl Decode for Version {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut v = Version::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => v.version = f.string()?,
                2 => v.revision = f.string()?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(v)
    }
}

// ------------------------------------------------------------------ leases

pub struct CreateLease<'a> {
    pub id: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
}

impl Encode for CreateLease<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.id);
        labels(out, 3, self.labels);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub created_at: Timestamp,
    pub labels: Labels,
}

impl Decode for Lease {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut l = Lease::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => l.id = f.string()?,
                2 => l.created_at = sub(&f)?,
                3 => label(&f, &mut l.labels)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(l)
    }
}

/// `CreateResponse{lease = 1}` (and any other "one embedded message in field 1" response).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Field1<T>(pub T);

impl<T: Decode + Default> Decode for Field1<T> {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut v = None;
        pb::for_each(buf, |f| {
            if f.num == 1 {
                v = Some(sub(&f)?);
            }
            Ok(())
        })?;
        Ok(Field1(v.unwrap_or_default()))
    }
}

pub struct DeleteLease<'a> {
    pub id: &'a str,
    /// Run the garbage collector before returning.
    pub sync: bool,
}

impl Encode for DeleteLease<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.id);
        pb::boolean(out, 2, self.sync);
    }
}

// ------------------------------------------------------------------ content

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAction {
    Stat = 0,
    Write = 1,
    Commit = 2,
}

pub struct WriteContent<'a> {
    pub action: WriteAction,
    /// Only needed on the first message of a stream.
    pub reference: &'a str,
    pub total: i64,
    pub expected: &'a str,
    pub offset: i64,
    pub data: &'a [u8],
    /// Applied at commit (the gc labels go here, spec §3.2).
    pub labels: &'a [(&'a str, &'a str)],
}

impl Encode for WriteContent<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::uint(out, 1, self.action as u64);
        pb::string(out, 2, self.reference);
        pb::int64(out, 3, self.total);
        pb::string(out, 4, self.expected);
        pb::int64(out, 5, self.offset);
        pb::bytes(out, 6, self.data);
        labels(out, 7, self.labels);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteContentResponse {
    pub action: u32,
    pub offset: i64,
    pub total: i64,
    pub digest: String,
}

impl Decode for WriteContentResponse {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut r = WriteContentResponse::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => r.action = f.u32()?,
                4 => r.offset = f.i64()?,
                5 => r.total = f.i64()?,
                6 => r.digest = f.string()?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(r)
    }
}

pub struct Digest<'a>(pub &'a str);

impl Encode for Digest<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.0);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentInfo {
    pub digest: String,
    pub size: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub labels: Labels,
}

impl Decode for ContentInfo {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut i = ContentInfo::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => i.digest = f.string()?,
                2 => i.size = f.i64()?,
                3 => i.created_at = sub(&f)?,
                4 => i.updated_at = sub(&f)?,
                5 => label(&f, &mut i.labels)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(i)
    }
}

/// `UpdateRequest{info = 1 {digest = 1, labels = 5}, update_mask = 2 {paths = 1}}` setting only
/// `labels.<key>` for the given keys: other labels of the blob are kept.
pub struct UpdateContentLabels<'a> {
    pub digest: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
}

impl Encode for UpdateContentLabels<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::message(out, 1, |m| {
            pb::string(m, 1, self.digest);
            labels(m, 5, self.labels);
        });
        pb::message(out, 2, |m| {
            for (k, _) in self.labels {
                pb::repeated_string(m, 1, &format!("labels.{k}"));
            }
        });
    }
}

/// `ReadContentRequest{digest = 1, offset = 2, size = 3}`; size 0 reads to the end.
pub struct ReadContent<'a> {
    pub digest: &'a str,
    pub offset: i64,
    pub size: i64,
}

impl Encode for ReadContent<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.digest);
        pb::int64(out, 2, self.offset);
        pb::int64(out, 3, self.size);
    }
}

/// One message of the Content/Read stream: `{offset = 1, data = 2}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentChunk {
    pub offset: i64,
    pub data: Vec<u8>,
}

impl Decode for ContentChunk {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut c = ContentChunk::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => c.offset = f.i64()?,
                2 => c.data = f.bytes()?.to_vec(),
                _ => {}
            }
            Ok(())
        })?;
        Ok(c)
    }
}

// ------------------------------------------------------------------ snapshots

/// Prepare (and View) request.
pub struct PrepareSnapshot<'a> {
    pub snapshotter: &'a str,
    pub key: &'a str,
    pub parent: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
}

impl Encode for PrepareSnapshot<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.snapshotter);
        pb::string(out, 2, self.key);
        pb::string(out, 3, self.parent);
        labels(out, 4, self.labels);
    }
}

/// Mounts, Remove and Stat requests: `{snapshotter = 1, key = 2}`.
pub struct SnapshotKey<'a> {
    pub snapshotter: &'a str,
    pub key: &'a str,
}

impl Encode for SnapshotKey<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.snapshotter);
        pb::string(out, 2, self.key);
    }
}

pub struct CommitSnapshot<'a> {
    pub snapshotter: &'a str,
    /// The committed name (the chain id for image layers).
    pub name: &'a str,
    /// The active snapshot's key.
    pub key: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
}

impl Encode for CommitSnapshot<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.snapshotter);
        pb::string(out, 2, self.name);
        pb::string(out, 3, self.key);
        labels(out, 4, self.labels);
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SnapshotKind {
    #[default]
    Unknown,
    View,
    Active,
    Committed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub parent: String,
    pub kind: SnapshotKind,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub labels: Labels,
}

impl Decode for SnapshotInfo {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut i = SnapshotInfo::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => i.name = f.string()?,
                2 => i.parent = f.string()?,
                3 => {
                    i.kind = match f.u32()? {
                        1 => SnapshotKind::View,
                        2 => SnapshotKind::Active,
                        3 => SnapshotKind::Committed,
                        _ => SnapshotKind::Unknown,
                    }
                }
                4 => i.created_at = sub(&f)?,
                5 => i.updated_at = sub(&f)?,
                6 => label(&f, &mut i.labels)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(i)
    }
}

/// `UsageResponse{size = 1, inodes = 2}`: disk use of one snapshot (its own layer only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotUsage {
    pub size: i64,
    pub inodes: i64,
}

impl Decode for SnapshotUsage {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut u = SnapshotUsage::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => u.size = f.i64()?,
                2 => u.inodes = f.i64()?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(u)
    }
}

// ------------------------------------------------------------------ diff

pub struct ApplyDiff<'a> {
    pub diff: &'a Descriptor,
    pub mounts: &'a [Mount],
}

impl Encode for ApplyDiff<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::message(out, 1, |m| self.diff.encode(m));
        for mount in self.mounts {
            pb::message(out, 2, |m| mount.encode(m));
        }
    }
}

// ------------------------------------------------------------------ images

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub labels: Labels,
    pub target: Descriptor,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Encode for Image {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, &self.name);
        for (k, v) in &self.labels {
            pb::map_entry(out, 2, k, v);
        }
        pb::message(out, 3, |m| self.target.encode(m));
    }
}

impl Decode for Image {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut i = Image::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => i.name = f.string()?,
                2 => label(&f, &mut i.labels)?,
                3 => i.target = sub(&f)?,
                7 => i.created_at = sub(&f)?,
                8 => i.updated_at = sub(&f)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(i)
    }
}

/// `CreateImageRequest{image = 1}` and `UpdateImageRequest{image = 1}` (no mask: all fields).
pub struct ImageRequest<'a>(pub &'a Image);

impl Encode for ImageRequest<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::message(out, 1, |m| self.0.encode(m));
    }
}

/// Requests that are a single string in field 1 (Images/Get name, Containers/Delete id,
/// Tasks/Delete container id, Content/Info digest, Tasks/List filter).
pub struct Str1<'a>(pub &'a str);

impl Encode for Str1<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.0);
    }
}

// ------------------------------------------------------------------ containers

/// `containerd.runc.v1.Options` for the runc v2 shim (spec §3.3); empty fields are omitted.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuncOptions<'a> {
    pub binary_name: &'a str,
    /// runc's state root; the shim appends the namespace. The default
    /// (`/run/containerd/runc`) is shared by every containerd on the host.
    pub root: &'a str,
    /// Use systemd cgroups (`cgroupsPath` then is `slice:prefix:name`).
    pub systemd_cgroup: bool,
}

/// Proto `Any`s carry the bare message name in containerd 1.6/1.7 (spec §3.3).
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";

impl Encode for RuncOptions<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 6, self.binary_name);
        pb::string(out, 7, self.root);
        pb::boolean(out, 9, self.systemd_cgroup);
    }
}

/// What we send to Containers/Create (spec §3.3; `image` and labels are optional).
pub struct NewContainer<'a> {
    pub id: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub image: &'a str,
    pub runtime: &'a str,
    pub runc_options: Option<RuncOptions<'a>>,
    /// The OCI runtime spec as JSON bytes (built by the caller).
    pub spec_json: &'a [u8],
    pub snapshotter: &'a str,
    pub snapshot_key: &'a str,
}

impl Encode for NewContainer<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::message(out, 1, |c| {
            pb::string(c, 1, self.id);
            labels(c, 2, self.labels);
            pb::string(c, 3, self.image);
            pb::message(c, 4, |r| {
                pb::string(r, 1, self.runtime);
                if let Some(o) = &self.runc_options {
                    pb::message(r, 2, |a| {
                        pb::string(a, 1, RUNC_OPTIONS_TYPE_URL);
                        pb::message(a, 2, |v| o.encode(v));
                    });
                }
            });
            pb::message(c, 5, |a| {
                pb::string(a, 1, RUNTIME_SPEC_TYPE_URL);
                pb::bytes(a, 2, self.spec_json);
            });
            pb::string(c, 6, self.snapshotter);
            pb::string(c, 7, self.snapshot_key);
        });
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub labels: Labels,
    pub image: String,
    pub runtime: String,
    pub runtime_options: Any,
    pub spec_type_url: String,
    pub spec: Vec<u8>,
    pub snapshotter: String,
    pub snapshot_key: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Decode for Container {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut c = Container::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => c.id = f.string()?,
                2 => label(&f, &mut c.labels)?,
                3 => c.image = f.string()?,
                4 => pb::for_each(f.bytes()?, |r| {
                    match r.num {
                        1 => c.runtime = r.string()?,
                        2 => c.runtime_options = sub(&r)?,
                        _ => {}
                    }
                    Ok(())
                })?,
                5 => {
                    let any: Any = sub(&f)?;
                    c.spec_type_url = any.type_url;
                    c.spec = any.value;
                }
                6 => c.snapshotter = f.string()?,
                7 => c.snapshot_key = f.string()?,
                8 => c.created_at = sub(&f)?,
                9 => c.updated_at = sub(&f)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(c)
    }
}

/// `ListContainersResponse{containers = 1}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Containers(pub Vec<Container>);

impl Decode for Containers {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut v = Vec::new();
        pb::for_each(buf, |f| {
            if f.num == 1 {
                v.push(sub(&f)?);
            }
            Ok(())
        })?;
        Ok(Containers(v))
    }
}

/// `ListContainersRequest{filters = 1}`.
pub struct Filters<'a>(pub &'a [&'a str]);

impl Encode for Filters<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        for f in self.0 {
            pb::repeated_string(out, 1, f);
        }
    }
}

// ------------------------------------------------------------------ tasks

pub struct CreateTask<'a> {
    pub container_id: &'a str,
    pub rootfs: &'a [Mount],
    pub stdin: &'a str,
    /// `file:///abs/path` makes the shim append stdout and stderr to that file (spec §3.4).
    pub stdout: &'a str,
    pub stderr: &'a str,
    pub terminal: bool,
}

impl Encode for CreateTask<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.container_id);
        for mount in self.rootfs {
            pb::message(out, 3, |m| mount.encode(m));
        }
        pb::string(out, 4, self.stdin);
        pb::string(out, 5, self.stdout);
        pb::string(out, 6, self.stderr);
        pb::boolean(out, 7, self.terminal);
    }
}

/// `CreateTaskResponse{container_id = 1, pid = 2}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskCreated {
    pub container_id: String,
    pub pid: u32,
}

impl Decode for TaskCreated {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut t = TaskCreated::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => t.container_id = f.string()?,
                2 => t.pid = f.u32()?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(t)
    }
}

/// Start, Wait and Get requests: `{container_id = 1, exec_id = 2}`.
pub struct ProcessRef<'a> {
    pub container_id: &'a str,
    pub exec_id: &'a str,
}

impl Encode for ProcessRef<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.container_id);
        pb::string(out, 2, self.exec_id);
    }
}

/// `StartResponse{pid = 1}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pid(pub u32);

impl Decode for Pid {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut p = 0;
        pb::for_each(buf, |f| {
            if f.num == 1 {
                p = f.u32()?;
            }
            Ok(())
        })?;
        Ok(Pid(p))
    }
}

/// `WaitResponse{exit_status = 1, exited_at = 2}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStatus {
    pub exit_status: u32,
    pub exited_at: Timestamp,
}

impl Decode for ExitStatus {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut e = ExitStatus::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => e.exit_status = f.u32()?,
                2 => e.exited_at = sub(&f)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(e)
    }
}

pub struct KillTask<'a> {
    pub container_id: &'a str,
    pub exec_id: &'a str,
    pub signal: u32,
    /// Signal every process of the container.
    pub all: bool,
}

impl Encode for KillTask<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        pb::string(out, 1, self.container_id);
        pb::string(out, 2, self.exec_id);
        pb::uint(out, 3, self.signal as u64);
        pb::boolean(out, 4, self.all);
    }
}

/// `DeleteResponse{id = 1, pid = 2, exit_status = 3, exited_at = 4}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskDeleted {
    pub id: String,
    pub pid: u32,
    pub exit_status: u32,
    pub exited_at: Timestamp,
}

impl Decode for TaskDeleted {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut t = TaskDeleted::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => t.id = f.string()?,
                2 => t.pid = f.u32()?,
                3 => t.exit_status = f.u32()?,
                4 => t.exited_at = sub(&f)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(t)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProcessStatus {
    #[default]
    Unknown,
    Created,
    Running,
    Stopped,
    Paused,
    Pausing,
}

/// `containerd.v1.types.Process` (Tasks/Get and Tasks/List).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    pub container_id: String,
    pub id: String,
    pub pid: u32,
    pub status: ProcessStatus,
    pub exit_status: u32,
    pub exited_at: Timestamp,
}

impl Decode for Process {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut p = Process::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => p.container_id = f.string()?,
                2 => p.id = f.string()?,
                3 => p.pid = f.u32()?,
                4 => {
                    p.status = match f.u32()? {
                        1 => ProcessStatus::Created,
                        2 => ProcessStatus::Running,
                        3 => ProcessStatus::Stopped,
                        4 => ProcessStatus::Paused,
                        5 => ProcessStatus::Pausing,
                        _ => ProcessStatus::Unknown,
                    }
                }
                9 => p.exit_status = f.u32()?,
                10 => p.exited_at = sub(&f)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(p)
    }
}

/// `ListTasksResponse{tasks = 1}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Processes(pub Vec<Process>);

impl Decode for Processes {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut v = Vec::new();
        pb::for_each(buf, |f| {
            if f.num == 1 {
                v.push(sub(&f)?);
            }
            Ok(())
        })?;
        Ok(Processes(v))
    }
}

// ------------------------------------------------------------------ events

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Any {
    pub type_url: String,
    pub value: Vec<u8>,
}

impl Decode for Any {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let mut a = Any::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => a.type_url = f.string()?,
                2 => a.value = f.bytes()?.to_vec(),
                _ => {}
            }
            Ok(())
        })?;
        Ok(a)
    }
}

/// `containerd.events.TaskExit`. The init process's exit has `id == container_id`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskExit {
    pub container_id: String,
    pub id: String,
    pub pid: u32,
    pub exit_status: u32,
    pub exited_at: Timestamp,
}

/// The event payloads we act on; everything else keeps only its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    TaskExit(TaskExit),
    TaskStart {
        container_id: String,
        pid: u32,
    },
    TaskOom {
        container_id: String,
    },
    TaskDelete {
        container_id: String,
        pid: u32,
        exit_status: u32,
    },
    Other {
        type_url: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub timestamp: Timestamp,
    pub namespace: String,
    pub topic: String,
    pub event: Event,
}

impl Decode for Envelope {
    fn decode(buf: &[u8]) -> Result<Self, Error> {
        let (mut timestamp, mut namespace, mut topic) =
            (Timestamp::default(), String::new(), String::new());
        let mut any = Any::default();
        pb::for_each(buf, |f| {
            match f.num {
                1 => timestamp = sub(&f)?,
                2 => namespace = f.string()?,
                3 => topic = f.string()?,
                4 => any = sub(&f)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(Envelope {
            timestamp,
            namespace,
            topic,
            event: decode_event(any)?,
        })
    }
}

/// Event `Any`s use the bare message name as type_url in containerd 1.6/1.7 (spec §3.3);
/// accept the `type.googleapis.com/` form too in case a later version adds it.
fn decode_event(any: Any) -> Result<Event, Error> {
    let name = any.type_url.rsplit('/').next().unwrap_or("");
    let (mut cid, mut id, mut pid, mut status, mut at) =
        (String::new(), String::new(), 0, 0, Timestamp::default());
    let ev = match name {
        "containerd.events.TaskExit" => {
            pb::for_each(&any.value, |f| {
                match f.num {
                    1 => cid = f.string()?,
                    2 => id = f.string()?,
                    3 => pid = f.u32()?,
                    4 => status = f.u32()?,
                    5 => at = sub(&f)?,
                    _ => {}
                }
                Ok(())
            })?;
            Event::TaskExit(TaskExit {
                container_id: cid,
                id,
                pid,
                exit_status: status,
                exited_at: at,
            })
        }
        "containerd.events.TaskStart" => {
            pb::for_each(&any.value, |f| {
                match f.num {
                    1 => cid = f.string()?,
                    2 => pid = f.u32()?,
                    _ => {}
                }
                Ok(())
            })?;
            Event::TaskStart {
                container_id: cid,
                pid,
            }
        }
        "containerd.events.TaskOOM" => {
            pb::for_each(&any.value, |f| {
                if f.num == 1 {
                    cid = f.string()?;
                }
                Ok(())
            })?;
            Event::TaskOom { container_id: cid }
        }
        "containerd.events.TaskDelete" => {
            pb::for_each(&any.value, |f| {
                match f.num {
                    1 => cid = f.string()?,
                    2 => pid = f.u32()?,
                    3 => status = f.u32()?,
                    _ => {}
                }
                Ok(())
            })?;
            Event::TaskDelete {
                container_id: cid,
                pid,
                exit_status: status,
            }
        }
        _ => Event::Other {
            type_url: any.type_url,
        },
    };
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(m: &impl Encode) -> Vec<u8> {
        let mut v = Vec::new();
        m.encode(&mut v);
        v
    }

    #[test]
    fn descriptor_and_mount_round_trip() {
        let d = Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: "sha256:abc".into(),
            size: 3_000_000_000,
            annotations: vec![("a".into(), "b".into())],
        };
        assert_eq!(Descriptor::decode(&enc(&d)).unwrap(), d);
        let m = Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec!["index=off".into(), "lowerdir=/a:/b".into(), String::new()],
        };
        assert_eq!(Mount::decode(&enc(&m)).unwrap(), m);
        let ms = {
            let mut v = Vec::new();
            pb::message(&mut v, 1, |b| m.encode(b));
            pb::message(&mut v, 1, |b| m.encode(b));
            v
        };
        assert_eq!(Mounts::decode(&ms).unwrap(), Mounts(vec![m.clone(), m]));
    }

    #[test]
    fn write_request_encoding_matches_the_spec_field_numbers() {
        let w = WriteContent {
            action: WriteAction::Commit,
            reference: "r",
            total: 3,
            expected: "d",
            offset: 1,
            data: b"xy",
            labels: &[("k", "v")],
        };
        assert_eq!(
            enc(&w),
            [
                0x08, 2, // action
                0x12, 1, b'r', // ref
                0x18, 3, // total
                0x22, 1, b'd', // expected
                0x28, 1, // offset
                0x32, 2, b'x', b'y', // data
                0x3a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', // labels
            ]
        );
        // STAT is action 0 and so omitted, as proto3 does.
        let s = WriteContent {
            action: WriteAction::Stat,
            reference: "r",
            total: 0,
            expected: "",
            offset: 0,
            data: &[],
            labels: &[],
        };
        assert_eq!(enc(&s), [0x12, 1, b'r']);
    }

    #[test]
    fn container_request_shape() {
        let c = NewContainer {
            id: "c1",
            labels: &[],
            image: "",
            runtime: RUNC_V2,
            runc_options: Some(RuncOptions {
                root: "/x/runc",
                ..RuncOptions::default()
            }),
            spec_json: b"{}",
            snapshotter: "overlayfs",
            snapshot_key: "c1",
        };
        let bytes = enc(&c);
        // Decode it back through the response type, which shares the field numbers.
        let mut got = None;
        pb::for_each(&bytes, |f| {
            got = Some(Container::decode(f.bytes()?)?);
            Ok(())
        })
        .unwrap();
        let got = got.unwrap();
        assert_eq!(got.id, "c1");
        assert_eq!(got.runtime, RUNC_V2);
        assert_eq!(got.runtime_options.type_url, RUNC_OPTIONS_TYPE_URL);
        assert_eq!(
            got.runtime_options.value,
            [0x3a, 7, b'/', b'x', b'/', b'r', b'u', b'n', b'c']
        );
        assert_eq!(got.spec_type_url, RUNTIME_SPEC_TYPE_URL);
        assert_eq!(got.spec, b"{}");
        assert_eq!(
            (got.snapshotter.as_str(), got.snapshot_key.as_str()),
            ("overlayfs", "c1")
        );
    }

    #[test]
    fn task_exit_envelope() {
        let mut exit = Vec::new();
        pb::string(&mut exit, 1, "c1");
        pb::string(&mut exit, 2, "c1");
        pb::uint(&mut exit, 3, 4242);
        pb::uint(&mut exit, 4, 7);
        pb::message(&mut exit, 5, |t| {
            pb::int64(t, 1, 1_700_000_000);
            pb::uint(t, 2, 5);
        });
        pb::string(&mut exit, 99, "unknown field from a newer containerd");
        let mut env = Vec::new();
        pb::message(&mut env, 1, |t| pb::int64(t, 1, 1_700_000_001));
        pb::string(&mut env, 2, "oakestra");
        pb::string(&mut env, 3, "/tasks/exit");
        pb::message(&mut env, 4, |a| {
            pb::string(a, 1, "containerd.events.TaskExit");
            pb::bytes(a, 2, &exit);
        });
        let e = Envelope::decode(&env).unwrap();
        assert_eq!(e.namespace, "oakestra");
        assert_eq!(e.topic, "/tasks/exit");
        assert_eq!(
            e.event,
            Event::TaskExit(TaskExit {
                container_id: "c1".into(),
                id: "c1".into(),
                pid: 4242,
                exit_status: 7,
                exited_at: Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5
                },
            })
        );
        // Truncated envelopes are errors, not panics.
        for cut in 1..env.len() {
            let _ = Envelope::decode(&env[..cut]);
        }
        assert!(Envelope::decode(&env[..env.len() - 1]).is_err());
    }

    #[test]
    fn zero_time_and_negative_int64() {
        // gogoproto non-nullable timestamps arrive as 0001-01-01 (seconds = -62135596800).
        let mut t = Vec::new();
        pb::int64(&mut t, 1, -62_135_596_800);
        assert_eq!(Timestamp::decode(&t).unwrap().seconds, -62_135_596_800);
    }

    #[test]
    fn content_update_sets_only_the_named_labels() {
        let req = enc(&UpdateContentLabels {
            digest: "sha256:ab",
            labels: &[("k", "v")],
        });
        let mut info = Vec::new();
        pb::string(&mut info, 1, "sha256:ab");
        pb::map_entry(&mut info, 5, "k", "v");
        let mut mask = Vec::new();
        pb::repeated_string(&mut mask, 1, "labels.k");
        let mut want = Vec::new();
        pb::bytes(&mut want, 1, &info);
        pb::bytes(&mut want, 2, &mask);
        assert_eq!(req, want);
    }

    #[test]
    fn content_read_and_usage_messages() {
        let req = enc(&ReadContent {
            digest: "sha256:ab",
            offset: 0,
            size: 0,
        });
        // Zero offset and size are omitted (proto3 defaults): only the digest goes out.
        assert_eq!(req, [&[0x0a, 9][..], b"sha256:ab"].concat());
        let mut chunk = Vec::new();
        pb::int64(&mut chunk, 1, 4);
        pb::bytes(&mut chunk, 2, b"{}");
        let c = ContentChunk::decode(&chunk).unwrap();
        assert_eq!((c.offset, c.data.as_slice()), (4, &b"{}"[..]));
        let mut usage = Vec::new();
        pb::int64(&mut usage, 1, 8192);
        pb::int64(&mut usage, 2, 3);
        assert_eq!(
            SnapshotUsage::decode(&usage).unwrap(),
            SnapshotUsage {
                size: 8192,
                inodes: 3
            }
        );
    }
}
