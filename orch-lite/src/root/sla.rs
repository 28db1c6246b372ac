//! SLA descriptor `v2.0` validation (spec §3): JSON in, validated applications and services out,
//! or one error naming the field path (`applications[0].microservices[1].port`) and the fix.
//! Pure: conflicts with stored state (taken names, taken `rr_ip`) are checked by the caller.
//! Unknown keys are tolerated everywhere and kept, as upstream's schema has no
//! `additionalProperties: false`.

use serde_json::{Map, Value};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest app/service name or namespace. Upstream's schema and the NetManager's table-entry
/// check both use `^[a-zA-Z0-9]{1,30}$` (spec overlay §2.4); the docs' "10 characters" is
/// historical (issue #307). Enforcing the one real limit here means no name passes validation
/// and then fails at deploy time.
pub const NAME_MAX: usize = 30;
pub const SLA_VERSION: &str = "v2.0";
/// Virtualizations upstream workers advertise; `container` is stored as `docker` (spec §2.4).
pub const VIRTUALIZATIONS: [&str; 4] = ["container", "docker", "unikernel", "crosvm"];
/// Constraint types upstream's schema accepts; only `direct` is acted on (spec §3).
pub const CONSTRAINT_TYPES: [&str; 5] = ["direct", "geo", "latency", "clusters", "addons"];

#[derive(Debug, Clone, PartialEq)]
pub struct SlaError {
    /// 422 for an invalid descriptor, as upstream's schema check answers.
    pub status: u16,
    pub path: String,
    pub message: String,
}

impl fmt::Display for SlaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

fn err(path: &str, message: impl Into<String>) -> SlaError {
    SlaError {
        status: 422,
        path: path.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sla {
    pub customer_id: String,
    pub apps: Vec<AppSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AppSpec {
    /// `""` for a new application; an existing id for `POST /api/service/`.
    pub application_id: String,
    pub name: String,
    pub namespace: String,
    pub desc: String,
    pub services: Vec<ServiceSpec>,
    /// `applications[i]`, for error messages from later checks.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    /// Normalized: `container` → `docker`.
    pub virtualization: String,
    pub image: String,
    pub vcpus: u64,
    /// MB.
    pub memory: u64,
    pub rr_ip: Option<Ipv4Addr>,
    pub rr_ip_v6: Option<Ipv6Addr>,
    /// `{"type":"direct","cluster":...}`: the root plane's only constraint.
    pub direct_cluster: Option<String>,
    pub csi_drivers: Vec<String>,
    /// The microservice object as given (unknown keys included); the job document stores it.
    pub raw: Map<String, Value>,
    /// `applications[i].microservices[j]`.
    pub path: String,
}

pub fn valid_name(s: &str) -> bool {
    (1..=NAME_MAX).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Typed access to one JSON object's fields, with errors carrying the full path.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str) -> Result<Obj<'a>, SlaError> {
        match v {
            Value::Object(map) => Ok(Obj {
                map,
                path: path.into(),
            }),
            other => Err(err(
                path,
                format!("must be a JSON object, got {}", kind(other)),
            )),
        }
    }

    fn at(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.into()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, SlaError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(err(
                &self.at(key),
                format!("must be a string, got {}", kind(other)),
            )),
        }
    }

    fn req_str(&self, key: &str) -> Result<&'a str, SlaError> {
        self.opt_str(key)?
            .ok_or_else(|| err(&self.at(key), "is required (a string)"))
    }

    fn name(&self, key: &str) -> Result<&'a str, SlaError> {
        let s = self.req_str(key)?;
        if valid_name(s) {
            Ok(s)
        } else {
            Err(err(
                &self.at(key),
                format!(
                    "{s:?} is not a valid name: use 1 to {NAME_MAX} letters or digits, no symbols \
                     or spaces (it becomes part of <app>.<appns>.<service>.<servicens>)"
                ),
            ))
        }
    }

    fn opt_uint(&self, key: &str) -> Result<Option<u64>, SlaError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Ok(Some(u)),
                (None, Some(i), _) if i < 0 => {
                    Err(err(&self.at(key), format!("must not be negative, got {i}")))
                }
                (_, _, Some(f)) if f < 0.0 => {
                    Err(err(&self.at(key), format!("must not be negative, got {f}")))
                }
                _ => Err(err(
                    &self.at(key),
                    format!("must be a whole number, got {n}"),
                )),
            },
            Some(other) => Err(err(
                &self.at(key),
                format!("must be a non-negative integer, got {}", kind(other)),
            )),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<(), SlaError> {
        match self.map.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(()),
            Some(other) => Err(err(
                &self.at(key),
                format!("must be true or false, got {}", kind(other)),
            )),
        }
    }

    fn opt_array(&self, key: &str) -> Result<&'a [Value], SlaError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(other) => Err(err(
                &self.at(key),
                format!("must be an array, got {}", kind(other)),
            )),
        }
    }

    fn opt_str_array(&self, key: &str) -> Result<Vec<&'a str>, SlaError> {
        self.opt_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().ok_or_else(|| {
                    err(
                        &format!("{}[{i}]", self.at(key)),
                        format!("must be a string, got {}", kind(v)),
                    )
                })
            })
            .collect()
    }
}

/// Validates a whole descriptor (`POST /api/application/` and `POST /api/service/`).
pub fn validate(v: &Value) -> Result<Sla, SlaError> {
    let top = Obj::new(v, "")?;
    match top.opt_str("sla_version")? {
        Some(SLA_VERSION) => {}
        Some("v1.0") => {
            return Err(err(
                "sla_version",
                "\"v1.0\" is deprecated; rewrite the descriptor for \"v2.0\"",
            ))
        }
        Some(other) => {
            return Err(err(
                "sla_version",
                format!("unknown version {other:?}; the only supported one is \"v2.0\""),
            ))
        }
        None => {
            return Err(err(
                "sla_version",
                "is required; set \"sla_version\": \"v2.0\"",
            ))
        }
    }
    let customer_id = top.req_str("customerID")?.to_string();
    top.opt_str_array("args")?;
    if !top.map.contains_key("applications") {
        return Err(err(
            "applications",
            "is required (an array of applications)",
        ));
    }
    let apps_json = top.opt_array("applications")?;
    if apps_json.is_empty() {
        return Err(err(
            "applications",
            "is empty; describe at least one application",
        ));
    }
    let mut apps = Vec::with_capacity(apps_json.len());
    for (i, a) in apps_json.iter().enumerate() {
        let app = validate_app(a, &format!("applications[{i}]"))?;
        if let Some(prev) = apps
            .iter()
            .find(|p: &&AppSpec| p.name == app.name && p.namespace == app.namespace)
        {
            return Err(err(
                &app.path,
                format!(
                    "application {}.{} is described twice (also {})",
                    app.name, app.namespace, prev.path
                ),
            ));
        }
        apps.push(app);
    }
    // rr_ip must be unique across the descriptor too, not only against stored services.
    let mut seen: Vec<(&Ipv4Addr, &str)> = Vec::new();
    for s in apps.iter().flat_map(|a| &a.services) {
        if let Some(ip) = &s.rr_ip {
            if let Some((_, other)) = seen.iter().find(|(x, _)| *x == ip) {
                return Err(err(
                    &format!("{}.addresses.rr_ip", s.path),
                    format!("{ip} is also requested by {other}; each service needs its own rr_ip"),
                ));
            }
            seen.push((ip, &s.path));
        }
    }
    Ok(Sla { customer_id, apps })
}

fn validate_app(v: &Value, path: &str) -> Result<AppSpec, SlaError> {
    let o = Obj::new(v, path)?;
    let name = o.name("application_name")?.to_string();
    let namespace = o.name("application_namespace")?.to_string();
    let application_id = o.opt_str("applicationID")?.unwrap_or_default().to_string();
    let desc = o
        .opt_str("application_desc")?
        .unwrap_or_default()
        .to_string();
    if !o.map.contains_key("microservices") {
        return Err(err(
            &o.at("microservices"),
            "is required (an array, may be empty)",
        ));
    }
    let mut services: Vec<ServiceSpec> = Vec::new();
    for (j, m) in o.opt_array("microservices")?.iter().enumerate() {
        let s = validate_service(m, &format!("{path}.microservices[{j}]"))?;
        if let Some(prev) = services
            .iter()
            .find(|p| p.name == s.name && p.namespace == s.namespace)
        {
            return Err(err(
                &s.path,
                format!(
                    "service {}.{} is described twice in this application (also {})",
                    s.name, s.namespace, prev.path
                ),
            ));
        }
        services.push(s);
    }
    Ok(AppSpec {
        application_id,
        name,
        namespace,
        desc,
        services,
        path: path.into(),
    })
}

fn validate_service(v: &Value, path: &str) -> Result<ServiceSpec, SlaError> {
    let o = Obj::new(v, path)?;
    let name = o.name("microservice_name")?.to_string();
    let namespace = o.name("microservice_namespace")?.to_string();
    if let Some(id) = o.opt_str("microserviceID")? {
        if !id.is_empty() {
            return Err(err(
                &o.at("microserviceID"),
                "must be \"\" or absent; the server assigns service ids",
            ));
        }
    }
    let virt = o.req_str("virtualization")?;
    if !VIRTUALIZATIONS.contains(&virt) {
        return Err(err(
            &o.at("virtualization"),
            format!(
                "unknown virtualization {virt:?}; use one of {}",
                VIRTUALIZATIONS.join(", ")
            ),
        ));
    }
    let image = o.req_str("code")?;
    if image.trim().is_empty() {
        return Err(err(
            &o.at("code"),
            "is empty; give the image reference, e.g. \"docker.io/library/nginx:latest\"",
        ));
    }
    let mut vcpus = 0;
    let mut memory = 0;
    for key in [
        "memory",
        "vcpus",
        "vgpus",
        "vtpus",
        "bandwidth_in",
        "bandwidth_out",
        "storage",
    ] {
        let n = o.opt_uint(key)?.unwrap_or(0);
        match key {
            "memory" => memory = n,
            "vcpus" => vcpus = n,
            _ => {}
        }
    }
    for key in ["state", "sla_violation_strategy", "target_node"] {
        o.opt_str(key)?;
    }
    if let Some(p) = o.opt_str("port")? {
        check_ports(p).map_err(|m| err(&o.at("port"), m))?;
    }
    o.opt_bool("one_shot")?;
    o.opt_bool("privileged")?;
    for key in ["cmd", "added_files", "args"] {
        o.opt_str_array(key)?;
    }
    for (i, e) in o.opt_str_array("environment")?.iter().enumerate() {
        if !e.split_once('=').is_some_and(|(k, _)| !k.is_empty()) {
            return Err(err(
                &format!("{}[{i}]", o.at("environment")),
                format!("{e:?} is not KEY=VALUE"),
            ));
        }
    }
    if virt == "unikernel" {
        o.opt_str_array("arch")?;
    }
    let mut csi_drivers = Vec::new();
    for (i, vol) in o.opt_array("volumes")?.iter().enumerate() {
        let vo = Obj::new(vol, &format!("{}[{i}]", o.at("volumes")))?;
        vo.req_str("volume_id")?;
        csi_drivers.push(vo.req_str("csi_driver")?.to_string());
        vo.opt_str("mount_path")?;
    }
    let (rr_ip, rr_ip_v6) = match o.map.get("addresses") {
        None | Some(Value::Null) => (None, None),
        Some(a) => addresses(&Obj::new(a, &o.at("addresses"))?)?,
    };
    let mut direct_cluster = None;
    for (i, c) in o.opt_array("constraints")?.iter().enumerate() {
        let co = Obj::new(c, &format!("{}[{i}]", o.at("constraints")))?;
        let t = co.req_str("type")?;
        if !CONSTRAINT_TYPES.contains(&t) {
            return Err(err(
                &co.at("type"),
                format!(
                    "unknown constraint type {t:?}; use one of {}",
                    CONSTRAINT_TYPES.join(", ")
                ),
            ));
        }
        for key in ["area", "cluster", "node", "location"] {
            co.opt_str(key)?;
        }
        if t == "direct" {
            let cluster = co.opt_str("cluster")?.filter(|s| !s.is_empty());
            let node = co.opt_str("node")?.filter(|s| !s.is_empty());
            if cluster.is_none() && node.is_none() {
                return Err(err(&co.path, "a direct constraint needs \"cluster\" (a cluster name) and/or \"node\" (a worker hostname)"));
            }
            if let Some(c) = cluster {
                if direct_cluster
                    .replace(c.to_string())
                    .is_some_and(|prev| prev != c)
                {
                    return Err(err(
                        &co.at("cluster"),
                        "conflicts with another direct constraint naming a different cluster",
                    ));
                }
            }
        } else {
            log::info!(
                "{path}: constraint type {t:?} is accepted but not acted on (only \"direct\" is)"
            );
        }
    }
    o.opt_array("connectivity")?;
    Ok(ServiceSpec {
        name,
        namespace,
        virtualization: if virt == "container" {
            "docker".into()
        } else {
            virt.into()
        },
        image: image.into(),
        vcpus,
        memory,
        rr_ip,
        rr_ip_v6,
        direct_cluster,
        csi_drivers,
        raw: o.map.clone(),
        path: path.into(),
    })
}

fn addresses(o: &Obj) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), SlaError> {
    for key in ["closest_ip", "closest_ip_v6"] {
        o.opt_str(key)?;
    }
    o.opt_array("instances")?;
    let v4 = match o.opt_str("rr_ip")?.filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            let ip: Ipv4Addr = s
                .parse()
                .map_err(|_| err(&o.at("rr_ip"), format!("{s:?} is not an IPv4 address")))?;
            if !crate::root::ipam::in_service_range(ip) {
                return Err(err(
                    &o.at("rr_ip"),
                    format!(
                        "{ip} is outside the service range 10.30.0.0/16; pick an address 10.30.x.y"
                    ),
                ));
            }
            Some(ip)
        }
    };
    let v6 = match o.opt_str("rr_ip_v6")?.filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            let ip: Ipv6Addr = s
                .parse()
                .map_err(|_| err(&o.at("rr_ip_v6"), format!("{s:?} is not an IPv6 address")))?;
            if !crate::root::ipam::in_rr_v6_range(ip) {
                return Err(err(
                    &o.at("rr_ip_v6"),
                    format!("{ip} is outside the round-robin range fdff:2000::/21"),
                ));
            }
            Some(ip)
        }
    };
    Ok((v4, v6))
}

/// `"hostport:containerport[/tcp|udp]"`, several joined by `;`; a bare `"80"` or `"80/udp"`
/// is also used in upstream examples. Checked here because the worker's NetManager would
/// otherwise fail the instance long after the SLA was accepted.
pub fn check_ports(spec: &str) -> Result<(), String> {
    let hint =
        "use \"hostport:containerport[/tcp|udp]\", e.g. \"6080:80/tcp\"; join several with \";\"";
    if spec.trim().is_empty() {
        return Ok(());
    }
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (ports, proto) = entry.split_once('/').unwrap_or((entry, "tcp"));
        if !matches!(proto, "tcp" | "udp") {
            return Err(format!(
                "{entry:?}: protocol {proto:?} is not tcp or udp; {hint}"
            ));
        }
        let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|n| n > 0);
        let ok = match ports.split_once(':') {
            Some((h, c)) => port_ok(h) && port_ok(c),
            None => port_ok(ports),
        };
        if !ok {
            return Err(format!(
                "{entry:?} is not a valid port mapping (ports are 1-65535); {hint}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The getting-started descriptor from the docs (spec §9 step 4), verbatim.
    pub const CLIENTSRVR: &str = include_str!("testdata/clientsrvr.json");

    fn base() -> Value {
        serde_json::from_str(CLIENTSRVR).unwrap()
    }

    /// Applies `edit` to a copy of the descriptor and returns the error.
    fn bad(edit: impl FnOnce(&mut Value)) -> SlaError {
        let mut v = base();
        edit(&mut v);
        validate(&v).expect_err("descriptor should be rejected")
    }

    #[test]
    fn getting_started_descriptor_validates() {
        let sla = validate(&base()).unwrap();
        assert_eq!(sla.apps.len(), 1);
        let app = &sla.apps[0];
        assert_eq!(
            (app.name.as_str(), app.namespace.as_str()),
            ("clientsrvr", "test")
        );
        let [curl, nginx] = app.services.as_slice() else {
            panic!("two services")
        };
        assert_eq!(
            curl.virtualization, "docker",
            "container is stored as docker"
        );
        assert_eq!((curl.vcpus, curl.memory), (1, 100));
        assert_eq!(nginx.rr_ip, Some(Ipv4Addr::new(10, 30, 30, 30)));
        assert_eq!(nginx.image, "docker.io/library/nginx:latest");
        assert_eq!(nginx.raw["port"], "6080:80/tcp");
        assert_eq!(nginx.path, "applications[0].microservices[1]");
    }

    #[test]
    fn unknown_keys_are_tolerated_and_kept() {
        let mut v = base();
        v["dashboard_meta"] = json!({"x": 1});
        v["applications"][0]["color"] = json!("blue");
        v["applications"][0]["microservices"][0]["vcpu"] = json!(2);
        v["applications"][0]["microservices"][0]["addresses"] = json!({"future": true});
        let sla = validate(&v).unwrap();
        assert_eq!(sla.apps[0].services[0].raw["vcpu"], 2);
    }

    #[test]
    fn dashboard_app_without_services_validates() {
        let mut v = base();
        v["applications"][0]["microservices"] = json!([]);
        assert!(validate(&v).unwrap().apps[0].services.is_empty());
    }

    #[test]
    fn each_bad_case_names_its_field() {
        let ms = |j: usize| format!("applications[0].microservices[{j}]");
        let cases: Vec<(SlaError, String, &str)> = vec![
            (
                bad(|v| v["sla_version"] = json!("v3")),
                "sla_version".into(),
                "v2.0",
            ),
            (
                bad(|v| v["sla_version"] = json!("v1.0")),
                "sla_version".into(),
                "deprecated",
            ),
            (
                bad(|v| {
                    v.as_object_mut().unwrap().remove("sla_version");
                }),
                "sla_version".into(),
                "required",
            ),
            (
                bad(|v| {
                    v.as_object_mut().unwrap().remove("customerID");
                }),
                "customerID".into(),
                "required",
            ),
            (
                bad(|v| v["applications"] = json!({})),
                "applications".into(),
                "array",
            ),
            (
                bad(|v| v["applications"] = json!([])),
                "applications".into(),
                "empty",
            ),
            (
                bad(|v| v["applications"][0]["application_name"] = json!("a".repeat(31))),
                "applications[0].application_name".into(),
                "1 to 30",
            ),
            (
                bad(|v| v["applications"][0]["application_namespace"] = json!("te-st")),
                "applications[0].application_namespace".into(),
                "no symbols",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][1]["microservice_name"] = json!("ngi nx")
                }),
                format!("{}.microservice_name", ms(1)),
                "letters or digits",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][1]["microservice_namespace"] = json!("")
                }),
                format!("{}.microservice_namespace", ms(1)),
                "not a valid name",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][1]["port"] = json!(80)),
                format!("{}.port", ms(1)),
                "must be a string",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][1]["port"] = json!("6080:80/sctp")),
                format!("{}.port", ms(1)),
                "tcp or udp",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][1]["port"] = json!("70000:80")),
                format!("{}.port", ms(1)),
                "1-65535",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][1]["port"] = json!("abc")),
                format!("{}.port", ms(1)),
                "6080:80/tcp",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][1]["addresses"]["rr_ip"] =
                        json!("10.31.0.1")
                }),
                format!("{}.addresses.rr_ip", ms(1)),
                "10.30.0.0/16",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][1]["addresses"]["rr_ip"] =
                        json!("10.30.300.1")
                }),
                format!("{}.addresses.rr_ip", ms(1)),
                "not an IPv4",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][1]["addresses"]["rr_ip_v6"] =
                        json!("fc00::1")
                }),
                format!("{}.addresses.rr_ip_v6", ms(1)),
                "fdff:2000::/21",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][0]["addresses"] =
                        json!({"rr_ip": "10.30.30.30"})
                }),
                format!("{}.addresses.rr_ip", ms(1)),
                "also requested",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][0]["virtualization"] = json!("vm")),
                format!("{}.virtualization", ms(0)),
                "unknown virtualization",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][0]["memory"] = json!(-1)),
                format!("{}.memory", ms(0)),
                "negative",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][0]["vcpus"] = json!(-0.5)),
                format!("{}.vcpus", ms(0)),
                "negative",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][0]["storage"] = json!(1.5)),
                format!("{}.storage", ms(0)),
                "whole number",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][0]["vgpus"] = json!("1")),
                format!("{}.vgpus", ms(0)),
                "integer",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][0]["microserviceID"] = json!("abc")),
                format!("{}.microserviceID", ms(0)),
                "assigns",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("code");
                }),
                format!("{}.code", ms(0)),
                "required",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][0]["cmd"] = json!(["sh", 1])),
                format!("{}.cmd[1]", ms(0)),
                "string",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][0]["environment"] = json!(["=x"])),
                format!("{}.environment[0]", ms(0)),
                "KEY=VALUE",
            ),
            (
                bad(|v| v["applications"][0]["microservices"][0]["one_shot"] = json!("yes")),
                format!("{}.one_shot", ms(0)),
                "true or false",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][0]["constraints"] =
                        json!([{"type": "magic"}])
                }),
                format!("{}.constraints[0].type", ms(0)),
                "unknown constraint",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][0]["constraints"] =
                        json!([{"type": "direct"}])
                }),
                format!("{}.constraints[0]", ms(0)),
                "needs \"cluster\"",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][0]["volumes"] =
                        json!([{"volume_id": "v"}])
                }),
                format!("{}.volumes[0].csi_driver", ms(0)),
                "required",
            ),
            (
                bad(|v| {
                    v["applications"][0]["microservices"][0]["microservice_name"] = json!("nginx")
                }),
                ms(1),
                "twice",
            ),
            (
                bad(|v| {
                    let a = v["applications"][0].clone();
                    v["applications"].as_array_mut().unwrap().push(a);
                }),
                "applications[1]".into(),
                "twice",
            ),
        ];
        for (e, path, needle) in cases {
            assert_eq!(e.status, 422, "{e}");
            assert_eq!(e.path, path, "{e}");
            assert!(e.to_string().starts_with(&path), "{e}");
            assert!(
                e.message.contains(needle),
                "{e:?} should mention {needle:?}"
            );
        }
        assert_eq!(
            validate(&json!([1])).unwrap_err().message,
            "must be a JSON object, got an array"
        );
    }

    #[test]
    fn direct_constraints_and_volumes_are_extracted() {
        let mut v = base();
        v["applications"][0]["microservices"][0]["constraints"] =
            json!([{"type": "direct", "cluster": "edge1"}, {"type": "geo", "location": "1,2"}]);
        v["applications"][0]["microservices"][0]["volumes"] =
            json!([{"volume_id": "v1", "csi_driver": "csi.a", "mount_path": "/d"}]);
        let s = &validate(&v).unwrap().apps[0].services[0];
        assert_eq!(s.direct_cluster.as_deref(), Some("edge1"));
        assert_eq!(s.csi_drivers, vec!["csi.a".to_string()]);
    }

    #[test]
    fn port_syntax() {
        for ok in [
            "",
            "80",
            "80/udp",
            "6080:80/tcp",
            "6080:80;53:53/udp",
            "1:65535 ; ",
        ] {
            assert_eq!(check_ports(ok), Ok(()), "{ok}");
        }
        for bad in ["0", "x:80", "80:", "80/http", "6080:80/tcp/udp", "-1"] {
            assert!(check_ports(bad).is_err(), "{bad}");
        }
    }
}
