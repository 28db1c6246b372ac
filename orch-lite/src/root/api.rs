//! The root REST API (spec §2) as one route table, [`ROUTES`], and handlers from
//! [`Request`] to [`Response`] over the db. The table drives dispatch, authentication and the
//! OpenAPI check, so a route cannot exist without being documented. Bodies are plain JSON with
//! upstream's field names (never upstream's double-encoded strings, spec §2.1).

use crate::http::{Request, Response};
use crate::root::auth::{self, Claims, TokenKind};
use crate::root::clusters::{self, Outbound, ReportError};
use crate::root::db::{DbError, State};
use crate::root::ids;
use crate::root::ipam;
use crate::root::model::{App, Job, Oid, ServiceIp, JOB_OWN_KEYS};
use crate::root::placement;
use crate::root::sla::{self, ServiceSpec, SlaError};
use crate::root::Root;
use serde_json::{json, Value};
use std::net::{Ipv4Addr, Ipv6Addr};
use worker::protocol::Status;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Login and the API description.
    Public,
    /// A refresh token (`POST /api/auth/refresh`).
    Refresh,
    /// Any valid access token.
    User,
    /// An access token with role `Admin`.
    Admin,
    /// The cluster join token (CLUSTER_CONTRACT.md).
    Cluster,
}

pub struct Ctx<'a> {
    pub claims: Option<Claims>,
    /// The `{…}` segments of the route, in order.
    pub params: Vec<&'a str>,
    pub now: f64,
}

type Handler = fn(&Root, &Ctx, &Request) -> Response;

pub struct Route {
    pub method: &'static str,
    /// OpenAPI-style pattern without trailing slash (requests are normalized, http.rs).
    pub path: &'static str,
    pub access: Access,
    handler: Handler,
}

const fn r(method: &'static str, path: &'static str, access: Access, handler: Handler) -> Route {
    Route {
        method,
        path,
        access,
        handler,
    }
}

use Access::*;

pub const ROUTES: &[Route] = &[
    r("POST", "/api/auth/login", Public, login),
    r("POST", "/api/auth/refresh", Refresh, refresh),
    r("GET", "/api/docs", Public, docs),
    r("GET", "/api/openapi.json", Public, docs),
    r("GET", "/api/permission/{username}", User, permission),
    r("GET", "/api/user/{username}", User, user),
    r("POST", "/api/application", User, create_applications),
    r("GET", "/api/applications", Admin, all_applications),
    r("GET", "/api/applications/{userid}", User, user_applications),
    r("GET", "/api/application/{appid}", User, get_application),
    r("PUT", "/api/application/{appid}", User, update_application),
    r(
        "DELETE",
        "/api/application/{appid}",
        User,
        delete_application,
    ),
    r("POST", "/api/service", User, create_services),
    r("GET", "/api/services", Admin, all_services),
    r("GET", "/api/services/{appid}", User, app_services),
    r("GET", "/api/service/{serviceid}", User, get_service),
    r("DELETE", "/api/service/{serviceid}", User, delete_service),
    r(
        "POST",
        "/api/service/{serviceid}/instance",
        User,
        add_instance,
    ),
    r(
        "DELETE",
        "/api/service/{serviceid}/instance/{instance_number}",
        User,
        remove_instance,
    ),
    r("GET", "/api/clusters", User, list_clusters),
    r("GET", "/api/clusters/active", User, list_active_clusters),
    r("POST", "/api/clusters/register", Cluster, register_cluster),
    r(
        "POST",
        "/api/information/{cluster_id}",
        Cluster,
        cluster_report,
    ),
    r(
        "POST",
        "/api/information/{cluster_id}/jobs",
        Cluster,
        cluster_status_push,
    ),
    r("GET", "/api/net/subnet", Cluster, net_subnet),
    r(
        "GET",
        "/api/net/service/{job_name}/instances",
        Cluster,
        net_service_by_name,
    ),
    r(
        "GET",
        "/api/net/service/ip/{ip}/instances",
        Cluster,
        net_service_by_ip,
    ),
    r(
        "POST",
        "/api/net/service/net_deploy_status",
        Cluster,
        net_deploy_status,
    ),
];

pub const OPENAPI: &str = include_str!("openapi.json");

fn matches<'a>(pattern: &str, path: &'a str) -> Option<Vec<&'a str>> {
    let (mut p, mut s) = (pattern.split('/'), path.split('/'));
    let mut params = Vec::new();
    loop {
        match (p.next(), s.next()) {
            (None, None) => return Some(params),
            (Some(a), Some(b)) if a.starts_with('{') && !b.is_empty() => params.push(b),
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
}

/// Dispatches one request: route, authentication, handler.
pub fn handle(root: &Root, req: &Request) -> Response {
    let mut path_matched = false;
    for route in ROUTES {
        let Some(params) = matches(route.path, &req.path) else {
            continue;
        };
        path_matched = true;
        if route.method != req.method {
            continue;
        }
        let now = ids::now_secs_f64();
        let claims = match authenticate(root, route.access, req, now as i64) {
            Ok(c) => c,
            Err(resp) => return resp,
        };
        let resp = (route.handler)(
            root,
            &Ctx {
                claims,
                params,
                now,
            },
            req,
        );
        log::debug!("{} {} → {}", req.method, req.path, resp.status);
        return resp;
    }
    if path_matched {
        Response::error(
            405,
            &format!(
                "{} is not allowed on {}; see /api/docs",
                req.method, req.path
            ),
        )
    } else {
        Response::error(
            404,
            &format!(
                "no such endpoint: {} {}; see /api/docs",
                req.method, req.path
            ),
        )
    }
}

fn authenticate(
    root: &Root,
    access: Access,
    req: &Request,
    now: i64,
) -> Result<Option<Claims>, Response> {
    let kind = match access {
        Public => return Ok(None),
        Cluster => {
            return match req.bearer() {
                Some(t) if auth::ct_eq(t.as_bytes(), root.join_token.as_bytes()) => Ok(None),
                _ => Err(Response::error(
                    401,
                    "cluster endpoints need Authorization: Bearer <join token> (the root's OAK_JOIN_TOKEN, or the token in $OAK_DATA_DIR/join-token on the root)",
                )),
            };
        }
        Refresh => TokenKind::Refresh,
        User | Admin => TokenKind::Access,
    };
    let token = req.bearer().ok_or_else(|| {
        Response::error(401, "Missing authentication token: send Authorization: Bearer <token> from POST /api/auth/login")
    })?;
    let claims = auth::verify(&root.key, token, now, kind)
        .map_err(|e| Response::error(401, &e.to_string()))?;
    if access == Admin && !claims.is_admin() {
        // Upstream's exact message (spec §2.1).
        return Err(Response::error(403, "You have not enough permissions!"));
    }
    Ok(Some(claims))
}

impl From<DbError> for Response {
    fn from(e: DbError) -> Response {
        log::error!("{e}");
        Response::error(500, &format!("cannot persist the change: {e}"))
    }
}

impl From<SlaError> for Response {
    fn from(e: SlaError) -> Response {
        Response::error(e.status, &e.to_string())
    }
}

fn body_json(req: &Request) -> Result<Value, Response> {
    req.json::<Value>()
}

fn caller<'c>(ctx: &'c Ctx) -> &'c Claims {
    // Invariant: every route with Access::User/Admin/Refresh has claims (authenticate).
    ctx.claims
        .as_ref()
        .expect("authenticated route without claims")
}

fn ok(v: impl serde::Serialize) -> Response {
    Response::json(200, &v)
}

fn message(m: &str) -> Response {
    ok(json!({ "message": m }))
}

// ---------------------------------------------------------------- docs

fn docs(_: &Root, _: &Ctx, _: &Request) -> Response {
    Response {
        status: 200,
        content_type: "application/json",
        body: OPENAPI.as_bytes().to_vec(),
    }
}

// ---------------------------------------------------------------- auth and users

fn issue(root: &Root, s: &State, user: &str, kind: TokenKind, now: i64) -> Option<String> {
    let u = s.user(user)?;
    let ttl = match kind {
        TokenKind::Access => root.settings.access_ttl,
        TokenKind::Refresh => root.settings.refresh_ttl,
    };
    let jti = ids::random_bytes(16)
        .map(|b| ids::hex(&b))
        .unwrap_or_else(|_| ids::new_oid(now as u64));
    let claims = Claims::new(kind, &u.name, &u.roles, &s.organization_id, now, ttl, jti);
    Some(auth::sign(&root.key, &claims))
}

fn login(root: &Root, ctx: &Ctx, req: &Request) -> Response {
    let v = match body_json(req) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    let (Some(username), Some(password)) = (field("username"), field("password")) else {
        return Response::error(400, "username and password are required strings: {\"username\": \"Admin\", \"password\": \"…\"}");
    };
    // The code reads organization_name; the upstream OpenAPI calls it organization (spec §2.2).
    let org = field("organization_name")
        .or(field("organization"))
        .unwrap_or("");
    if !org.is_empty() && org != "root" {
        return Response::error(
            404,
            &format!("organization {org:?} not found; the only organization is \"root\""),
        );
    }
    let now = ctx.now as i64;
    root.db.read(|s| {
        let valid = s
            .user(username)
            .is_some_and(|u| auth::verify_password(password, &u.password));
        if !valid {
            log::info!("failed login for {username:?} from {:?}", req.remote);
            return Response::error(401, "wrong username or password");
        }
        match (
            issue(root, s, username, TokenKind::Access, now),
            issue(root, s, username, TokenKind::Refresh, now),
        ) {
            (Some(token), Some(refresh_token)) => {
                ok(json!({"token": token, "refresh_token": refresh_token}))
            }
            _ => Response::not_found("user"),
        }
    })
}

fn refresh(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    let c = caller(ctx);
    root.db.read(
        |s| match issue(root, s, &c.sub, TokenKind::Access, ctx.now as i64) {
            Some(token) => ok(json!({ "token": token })),
            None => Response::error(404, &format!("user {} no longer exists", c.sub)),
        },
    )
}

fn own_user_only(ctx: &Ctx) -> Result<(), Response> {
    let c = caller(ctx);
    if c.sub == ctx.params[0] || c.is_admin() {
        Ok(())
    } else {
        Err(Response::error(403, "you can only read your own user"))
    }
}

fn permission(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    if let Err(r) = own_user_only(ctx) {
        return r;
    }
    root.db.read(|s| match s.user(ctx.params[0]) {
        Some(u) => ok(json!({ "roles": u.roles })),
        None => Response::not_found(&format!("user {}", ctx.params[0])),
    })
}

fn user(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    if let Err(r) = own_user_only(ctx) {
        return r;
    }
    root.db.read(|s| match s.user(ctx.params[0]) {
        Some(u) => ok(u.public_doc()),
        None => Response::not_found(&format!("user {}", ctx.params[0])),
    })
}

// ---------------------------------------------------------------- applications

/// An application the caller may see; 404 otherwise, so ids of others do not leak.
fn owned_app<'s>(s: &'s State, c: &Claims, id: &str) -> Result<&'s App, Response> {
    s.app(id)
        .filter(|a| a.user_id == c.sub || c.is_admin())
        .ok_or_else(|| Response::not_found(&format!("application {id}")))
}

fn owned_job<'s>(s: &'s State, c: &Claims, id: &str) -> Result<&'s Job, Response> {
    s.job(id)
        .filter(|j| owned_app(s, c, &j.application_id).is_ok())
        .ok_or_else(|| Response::not_found(&format!("service {id}")))
}

fn apps_of(s: &State, user: &str) -> Vec<App> {
    s.apps
        .iter()
        .filter(|a| a.user_id == user)
        .cloned()
        .collect()
}

/// Creates the services of `specs` in application `app_id` (all or none: the caller's write
/// is discarded on error). Returns the new ids.
fn build_jobs(
    s: &mut State,
    app_id: &str,
    specs: &[ServiceSpec],
    now: f64,
) -> Result<Vec<String>, Response> {
    let app = s
        .app(app_id)
        .cloned()
        .ok_or_else(|| Response::not_found(&format!("application {app_id}")))?;
    let mut ids_out = Vec::new();
    for spec in specs {
        if s.jobs.iter().any(|j| {
            j.application_id == app_id
                && j.service_name == spec.name
                && j.service_ns == spec.namespace
        }) {
            return Err(Response::error(
                409,
                &format!(
                    "{}: service {}.{} already exists in application {}; delete it first",
                    spec.path, spec.name, spec.namespace, app.application_name
                ),
            ));
        }
        let conflict = |field: &str, e: ipam::IpamError| {
            let status = if matches!(e, ipam::IpamError::Exhausted) {
                503
            } else {
                409
            };
            Response::error(status, &format!("{}.addresses.{field}: {e}", spec.path))
        };
        let rr = match spec.rr_ip {
            Some(ip) => s
                .ipam
                .reserve(ip)
                .map(|_| ip)
                .map_err(|e| conflict("rr_ip", e))?,
            None => s.ipam.allocate().map_err(|e| conflict("rr_ip", e))?,
        };
        let rr6 = match spec.rr_ip_v6 {
            Some(ip) => s
                .ipam
                .reserve_v6(ip)
                .map(|_| ip.to_string())
                .map_err(|e| conflict("rr_ip_v6", e))?,
            None => {
                let d = ipam::rr_v6_for(rr);
                // A user-chosen rr_ip_v6 may already hold the derived twin; then go without v6.
                s.ipam
                    .reserve_v6(d)
                    .map(|_| d.to_string())
                    .unwrap_or_default()
            }
        };
        let id = ids::new_oid(now as u64);
        let mut sla_doc = spec.raw.clone();
        for k in JOB_OWN_KEYS {
            sla_doc.remove(k);
        }
        s.jobs.push(Job {
            id: Oid::new(&id),
            microservice_id: id.clone(),
            application_id: app_id.into(),
            job_name: format!(
                "{}.{}.{}.{}",
                app.application_name, app.application_namespace, spec.name, spec.namespace
            ),
            app_name: app.application_name.clone(),
            app_ns: app.application_namespace.clone(),
            service_name: spec.name.clone(),
            service_ns: spec.namespace.clone(),
            image: spec.image.clone(),
            virtualization: spec.virtualization.clone(),
            next_instance_progressive_number: 0,
            instance_list: Vec::new(),
            rr_ip: rr.to_string(),
            rr_ip_v6: rr6.clone(),
            service_ip_list: vec![ServiceIp {
                ip_type: "RR".into(),
                address: rr.to_string(),
                address_v6: rr6,
            }],
            status: None,
            status_detail: None,
            sla: sla_doc,
        });
        if let Some(a) = s.app_mut(app_id) {
            a.microservices.push(id.clone());
        }
        ids_out.push(id);
    }
    Ok(ids_out)
}

fn create_applications(root: &Root, ctx: &Ctx, req: &Request) -> Response {
    let c = caller(ctx);
    let run = || -> Result<Response, Response> {
        let parsed = sla::validate(&body_json(req)?)?;
        root.db.write(|s| {
            for spec in &parsed.apps {
                if let Some(a) = s.apps.iter().find(|a| {
                    a.user_id == c.sub && a.application_name == spec.name && a.application_namespace == spec.namespace
                }) {
                    return Err(Response::error(
                        409,
                        &format!(
                            "{}: application {}.{} already exists (id {}); delete it or add services with POST /api/service/",
                            spec.path, spec.name, spec.namespace, a.id.oid
                        ),
                    ));
                }
                let id = ids::new_oid(ctx.now as u64);
                s.apps.push(App {
                    id: Oid::new(&id),
                    application_id: id.clone(),
                    application_name: spec.name.clone(),
                    application_namespace: spec.namespace.clone(),
                    application_desc: spec.desc.clone(),
                    user_id: c.sub.clone(),
                    microservices: Vec::new(),
                });
                build_jobs(s, &id, &spec.services, ctx.now)?;
            }
            // Upstream answers with all of the caller's applications (spec §2.3).
            Ok(ok(apps_of(s, &c.sub)))
        })
    };
    run().unwrap_or_else(|e| e)
}

fn all_applications(root: &Root, _: &Ctx, _: &Request) -> Response {
    root.db.read(|s| ok(&s.apps))
}

fn user_applications(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    let c = caller(ctx);
    root.db.read(|s| {
        let own_id = s
            .user(&c.sub)
            .map(|u| u.id.oid.as_str())
            .unwrap_or_default();
        // Upstream keys this route on the user's ObjectId; the username is accepted too.
        if ctx.params[0] != own_id && ctx.params[0] != c.sub {
            return Response::error(
                403,
                "you can only list your own applications (use your user id or name)",
            );
        }
        ok(apps_of(s, &c.sub))
    })
}

fn get_application(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    root.db.read(|s| {
        owned_app(s, caller(ctx), ctx.params[0])
            .map(ok)
            .unwrap_or_else(|e| e)
    })
}

fn update_application(root: &Root, ctx: &Ctx, req: &Request) -> Response {
    let c = caller(ctx);
    let run = || -> Result<Response, Response> {
        let v = body_json(req)?;
        let o = v
            .as_object()
            .ok_or_else(|| Response::error(400, "body must be a JSON object"))?;
        let text = |k: &str| -> Result<Option<String>, Response> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(Response::error(
                    422,
                    &format!("{k}: must be a string, got {other}"),
                )),
            }
        };
        let (name, ns, desc) = (
            text("application_name")?,
            text("application_namespace")?,
            text("application_desc")?,
        );
        for (k, val) in [("application_name", &name), ("application_namespace", &ns)] {
            if let Some(x) = val.as_deref().filter(|x| !sla::valid_name(x)) {
                return Err(Response::error(
                    422,
                    &format!(
                        "{k}: {x:?} is not a valid name: use 1 to {} letters or digits",
                        sla::NAME_MAX
                    ),
                ));
            }
        }
        root.db.write(|s| {
            let app = owned_app(s, c, ctx.params[0])?.clone();
            let new_name = name.clone().unwrap_or(app.application_name.clone());
            let new_ns = ns.clone().unwrap_or(app.application_namespace.clone());
            let renamed = new_name != app.application_name || new_ns != app.application_namespace;
            if renamed && !app.microservices.is_empty() {
                // Job names embed the application name; renaming would orphan running instances.
                return Err(Response::error(409, "application_name/application_namespace cannot change while the application has services; delete them first"));
            }
            if renamed && s.apps.iter().any(|a| a.user_id == app.user_id && a.application_name == new_name && a.application_namespace == new_ns) {
                return Err(Response::error(409, &format!("application {new_name}.{new_ns} already exists")));
            }
            // `microservices` in the body is ignored: services change through /api/service
            // (upstream overwrote the list, losing it when the key was missing, spec §2.3).
            let a = s.app_mut(ctx.params[0]).ok_or_else(|| Response::not_found("application"))?;
            a.application_name = new_name;
            a.application_namespace = new_ns;
            if let Some(d) = desc {
                a.application_desc = d;
            }
            Ok(message("Application is updated"))
        })
    };
    run().unwrap_or_else(|e| e)
}

/// Undeploy calls for every instance of `job`, one per cluster holding some.
fn undeploy_all(job: &Job) -> Vec<Outbound> {
    let mut clusters: Vec<&str> = job
        .instance_list
        .iter()
        .map(|i| i.cluster_id.as_str())
        .collect();
    clusters.sort();
    clusters.dedup();
    clusters
        .into_iter()
        .map(|c| Outbound::Undeploy {
            cluster_id: c.into(),
            job_id: job.id().into(),
            instance: -1,
        })
        .collect()
}

fn delete_application(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    let c = caller(ctx);
    let r = root.db.write(|s| {
        let app = owned_app(s, c, ctx.params[0])?.clone();
        let mut calls = Vec::new();
        for jid in &app.microservices {
            if let Some(job) = s.remove_job(jid) {
                calls.extend(undeploy_all(&job));
            }
        }
        s.apps.retain(|a| a.id != app.id);
        Ok::<_, Response>(calls)
    });
    match r {
        Ok(calls) => {
            root.send(calls);
            message("Application Deleted")
        }
        Err(e) => e,
    }
}

// ---------------------------------------------------------------- services

fn create_services(root: &Root, ctx: &Ctx, req: &Request) -> Response {
    let c = caller(ctx);
    let run = || -> Result<Response, Response> {
        let parsed = sla::validate(&body_json(req)?)?;
        // Upstream uses applications[0] only (spec §2.4).
        let spec = &parsed.apps[0];
        if spec.application_id.is_empty() {
            return Err(Response::error(
                422,
                "applications[0].applicationID: required; give the id of an existing application (create one with POST /api/application/)",
            ));
        }
        root.db.write(|s| {
            owned_app(s, c, &spec.application_id)?;
            let created = build_jobs(s, &spec.application_id, &spec.services, ctx.now)?;
            let deployed: Vec<Value> = spec
                .services
                .iter()
                .map(|m| json!({"service_name": m.name, "status": 200}))
                .collect();
            Ok(ok(json!({
                "job_id": created.last().cloned().unwrap_or_default(),
                "deployed_services": deployed,
                "failed_services": [],
            })))
        })
    };
    run().unwrap_or_else(|e| e)
}

fn all_services(root: &Root, _: &Ctx, _: &Request) -> Response {
    root.db.read(|s| ok(&s.jobs))
}

fn app_services(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    root.db
        .read(|s| match owned_app(s, caller(ctx), ctx.params[0]) {
            Ok(app) => ok(s
                .jobs
                .iter()
                .filter(|j| j.application_id == app.id.oid)
                .collect::<Vec<_>>()),
            Err(e) => e,
        })
}

fn get_service(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    root.db.read(|s| {
        owned_job(s, caller(ctx), ctx.params[0])
            .map(ok)
            .unwrap_or_else(|e| e)
    })
}

fn delete_service(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    let c = caller(ctx);
    let r = root.db.write(|s| {
        owned_job(s, c, ctx.params[0])?;
        let job = s
            .remove_job(ctx.params[0])
            .ok_or_else(|| Response::not_found("service"))?;
        Ok::<_, Response>(undeploy_all(&job))
    });
    match r {
        Ok(calls) => {
            root.send(calls);
            message("Job deleted")
        }
        Err(e) => e,
    }
}

fn add_instance(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    let c = caller(ctx);
    let id = ctx.params[0];
    let timeout = root.settings.cluster_timeout_secs;
    let r = root.db.write(|s| {
        owned_job(s, c, id)?;
        if let Some(j) = s.job_mut(id) {
            j.status = Some(Status::Requested);
            j.status_detail = Some("Waiting for scheduling decision".into());
        }
        // A rejection is a result, not an error: the negative status must be stored.
        Ok::<_, Response>(placement::add_instance(s, id, ctx.now, timeout))
    });
    match r {
        Ok(Ok((n, cluster_id))) => {
            root.send(vec![Outbound::Deploy {
                cluster_id,
                job_id: id.into(),
                instance: n,
            }]);
            ok(json!({"message": "ok", "instance_number": n, "status": Status::ClusterScheduled}))
        }
        // Upstream answers 200 either way and shows the reason in the job status (spec §2.5).
        Ok(Err(rej)) => {
            ok(json!({"message": "ok", "status": rej.status, "status_detail": rej.detail}))
        }
        Err(e) => e,
    }
}

fn remove_instance(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    let c = caller(ctx);
    let (id, n_text) = (ctx.params[0], ctx.params[1]);
    let Ok(n) = n_text.parse::<i64>() else {
        return Response::error(
            400,
            &format!("instance number {n_text:?} is not an integer (-1 removes all instances)"),
        );
    };
    let r = root.db.write(|s| {
        owned_job(s, c, id)?;
        let job = s
            .job_mut(id)
            .ok_or_else(|| Response::not_found("service"))?;
        let (gone, kept): (Vec<_>, Vec<_>) = job
            .instance_list
            .drain(..)
            .partition(|i| n == -1 || i.instance_number as i64 == n);
        job.instance_list = kept;
        if gone.is_empty() && n != -1 {
            let have: Vec<u64> = job
                .instance_list
                .iter()
                .map(|i| i.instance_number)
                .collect();
            return Err(Response::not_found(&format!(
                "instance {n} of service {id} (instances: {have:?})"
            )));
        }
        if job.instance_list.is_empty() {
            // Upstream leaves the last status (e.g. RUNNING) on an empty service (spec §9.8).
            job.status = Some(Status::Undeployed);
            job.status_detail = Some("all instances removed".into());
        }
        let calls: Vec<Outbound> = gone
            .iter()
            .map(|i| Outbound::Undeploy {
                cluster_id: i.cluster_id.clone(),
                job_id: id.into(),
                instance: i.instance_number as i64,
            })
            .collect();
        for i in &gone {
            s.release_instance_ips(&i.instance_ip, &i.instance_ip_v6);
        }
        Ok::<_, Response>(calls)
    });
    match r {
        Ok(calls) => {
            root.send(calls);
            message("ok")
        }
        Err(e) => e,
    }
}

// ---------------------------------------------------------------- clusters (user side)

fn clusters_doc(root: &Root, now: f64, only_active: bool) -> Response {
    let t = root.settings.cluster_timeout_secs;
    root.db.read(|s| {
        ok(s.clusters
            .iter()
            .filter(|c| !only_active || c.is_active(now, t))
            .map(|c| c.doc(now, t))
            .collect::<Vec<_>>())
    })
}

fn list_clusters(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    clusters_doc(root, ctx.now, false)
}

fn list_active_clusters(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    clusters_doc(root, ctx.now, true)
}

// ---------------------------------------------------------------- clusters (cluster side)

fn register_cluster(root: &Root, ctx: &Ctx, req: &Request) -> Response {
    let run = || -> Result<Response, Response> {
        let body = body_json(req)?;
        let reg = clusters::parse_registration(&body, req.remote.map(|a| a.ip()))
            .map_err(|e| Response::error(400, &e))?;
        root.db.write(|s| {
            Ok(ok(
                json!({ "id": clusters::register(s, reg, &body, ctx.now) }),
            ))
        })
    };
    run().unwrap_or_else(|e| e)
}

fn report_result(root: &Root, r: Result<Vec<Outbound>, Response>) -> Response {
    match r {
        Ok(calls) => {
            root.send(calls);
            ok("ok")
        }
        Err(e) => e,
    }
}

fn report_error(e: ReportError) -> Response {
    match e {
        ReportError::UnknownCluster(_) => Response::error(404, &e.to_string()),
        ReportError::Body(_) => Response::error(400, &e.to_string()),
    }
}

fn cluster_report(root: &Root, ctx: &Ctx, req: &Request) -> Response {
    let r = body_json(req).and_then(|body| {
        root.db.write(|s| {
            clusters::apply_report(s, ctx.params[0], &body, ctx.now).map_err(report_error)
        })
    });
    report_result(root, r)
}

fn cluster_status_push(root: &Root, ctx: &Ctx, req: &Request) -> Response {
    let r = body_json(req).and_then(|body| {
        root.db.write(|s| {
            clusters::apply_status_push(s, ctx.params[0], &body, ctx.now).map_err(report_error)
        })
    });
    report_result(root, r)
}

fn net_subnet(root: &Root, _: &Ctx, _: &Request) -> Response {
    root.db
        .write(|s| match s.next_worker_subnet() {
            Some((v4, v6)) => Ok(ok(
                json!({"subnet_addr": v4.to_string(), "subnet_addr_v6": v6.to_string()}),
            )),
            None => Err(Response::error(
                503,
                "worker subnets 10.18.0.0-10.29.255.192 are exhausted",
            )),
        })
        .unwrap_or_else(|e| e)
}

fn net_service_by_name(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    // Names are alphanumeric (sla::valid_name), so `_` can only stand for `.` (spec overlay §2.4).
    let name = ctx.params[0].replace('_', ".");
    root.db
        .read(|s| match s.jobs.iter().find(|j| j.job_name == name) {
            Some(j) => ok(j.table_doc()),
            None => Response::not_found(&format!("service {name}")),
        })
}

fn net_service_by_ip(root: &Root, ctx: &Ctx, _: &Request) -> Response {
    let raw = ctx.params[0];
    let v4 = raw
        .replace('_', ".")
        .parse::<Ipv4Addr>()
        .ok()
        .map(|ip| ip.to_string());
    let v6 = raw
        .replace('_', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(|ip| ip.to_string());
    let Some(ip) = v4.or(v6) else {
        return Response::error(
            400,
            &format!("{raw:?} is not an IP address (write dots or colons as _)"),
        );
    };
    root.db.read(|s| {
        let hit = s.jobs.iter().find(|j| {
            j.rr_ip == ip
                || j.rr_ip_v6 == ip
                || j.instance_list
                    .iter()
                    .any(|i| i.instance_ip == ip || i.instance_ip_v6 == ip)
        });
        match hit {
            Some(j) => ok(j.table_doc()),
            None => Response::not_found(&format!("service with address {ip}")),
        }
    })
}

fn net_deploy_status(root: &Root, _: &Ctx, req: &Request) -> Response {
    let run = || -> Result<Response, Response> {
        let body = body_json(req)?;
        let job_id = body
            .get("job_id")
            .and_then(Value::as_str)
            .ok_or_else(|| Response::error(400, "job_id: required string"))?;
        let instances = body
            .get("instances")
            .and_then(Value::as_array)
            .ok_or_else(|| Response::error(400, "instances: required array"))?;
        root.db.write(|s| {
            let job = s
                .job_mut(job_id)
                .ok_or_else(|| Response::not_found(&format!("service {job_id}")))?;
            for e in instances {
                let Some(inst) = e
                    .get("instance_number")
                    .and_then(Value::as_u64)
                    .and_then(|n| job.instance_mut(n))
                else {
                    continue;
                };
                let text = |k: &str| match e.get(k) {
                    Some(Value::String(v)) if v.len() <= 64 => Some(v.clone()),
                    Some(Value::Number(n)) => Some(n.to_string()),
                    _ => None,
                };
                for (f, k) in [
                    (&mut inst.namespace_ip, "namespace_ip"),
                    (&mut inst.namespace_ip_v6, "namespace_ip_v6"),
                    (&mut inst.tunnel_ip, "host_ip"),
                    (&mut inst.tunnel_port, "host_port"),
                ] {
                    if let Some(v) = text(k) {
                        *f = v;
                    }
                }
            }
            Ok(ok("ok"))
        })
    };
    run().unwrap_or_else(|e| e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::db::{Db, Memory};
    use crate::root::Settings;
    use std::sync::{Arc, Mutex};

    fn root() -> (Root, Arc<Mutex<Vec<Outbound>>>) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let s2 = sent.clone();
        let db = Arc::new(Db::open(Box::new(Memory)).unwrap());
        let settings = Settings {
            access_ttl: 600,
            refresh_ttl: 3600,
            cluster_timeout_secs: 30.0,
        };
        let r = Root::open(
            db,
            Some("pw"),
            Some("join"),
            settings,
            Box::new(move |c| s2.lock().unwrap().extend(c)),
        )
        .unwrap();
        (r, sent)
    }

    fn call(root: &Root, method: &str, path: &str, token: Option<&str>, body: &str) -> Response {
        let mut req = Request::new(method, path, body.as_bytes());
        if let Some(t) = token {
            req = req.with_header("Authorization", &format!("Bearer {t}"));
        }
        handle(root, &req)
    }

    fn login(root: &Root) -> (String, String) {
        let r = call(
            root,
            "POST",
            "/api/auth/login/",
            None,
            r#"{"username":"Admin","password":"pw"}"#,
        );
        assert_eq!(r.status, 200, "{:?}", r.value());
        let v = r.value();
        (
            v["token"].as_str().unwrap().into(),
            v["refresh_token"].as_str().unwrap().into(),
        )
    }

    #[test]
    fn route_patterns_match_segments() {
        assert_eq!(
            matches(
                "/api/service/{id}/instance/{n}",
                "/api/service/ab/instance/-1"
            ),
            Some(vec!["ab", "-1"])
        );
        assert_eq!(
            matches("/api/service/{id}", "/api/service/ab/instance"),
            None
        );
        assert_eq!(matches("/api/service/{id}", "/api/service/"), None);
        assert_eq!(matches("/api/clusters", "/api/clusters"), Some(vec![]));
    }

    #[test]
    fn auth_rules() {
        let (root, _) = root();
        let (token, refresh) = login(&root);
        assert_eq!(
            call(
                &root,
                "POST",
                "/api/auth/login",
                None,
                r#"{"username":"Admin","password":"x"}"#
            )
            .status,
            401
        );
        assert_eq!(
            call(
                &root,
                "POST",
                "/api/auth/login",
                None,
                r#"{"username":"Admin"}"#
            )
            .status,
            400
        );
        assert_eq!(
            call(
                &root,
                "POST",
                "/api/auth/login",
                None,
                r#"{"username":"Admin","password":"pw","organization_name":"acme"}"#
            )
            .status,
            404
        );
        let r = call(&root, "GET", "/api/applications", None, "");
        assert_eq!(
            (
                r.status,
                r.value()["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("Missing authentication token")
            ),
            (401, true)
        );
        assert_eq!(
            call(&root, "GET", "/api/applications", Some("a.b.c"), "").status,
            401
        );
        assert_eq!(
            call(&root, "GET", "/api/applications", Some(&refresh), "").status,
            401,
            "refresh token is not an access token"
        );
        assert_eq!(
            call(&root, "GET", "/api/applications/", Some(&token), "").status,
            200
        );
        assert_eq!(
            call(&root, "POST", "/api/auth/refresh", Some(&token), "").status,
            401,
            "access token cannot refresh"
        );
        let r = call(&root, "POST", "/api/auth/refresh", Some(&refresh), "");
        assert_eq!(r.status, 200);
        let fresh = r.value()["token"].as_str().unwrap().to_string();
        assert_eq!(
            call(&root, "GET", "/api/permission/Admin", Some(&fresh), "").value()["roles"][0],
            "Admin"
        );
        let u = call(&root, "GET", "/api/user/Admin", Some(&token), "").value();
        assert_eq!(u["name"], "Admin");
        assert!(u.get("password").is_none(), "hash never served");
        assert_eq!(
            call(&root, "POST", "/api/clusters/register", Some(&token), "{}").status,
            401,
            "user token is no join token"
        );
        assert_eq!(call(&root, "GET", "/api/net/subnet", None, "").status, 401);
        assert_eq!(
            call(&root, "GET", "/api/net/subnet", Some("join"), "").value()["subnet_addr"],
            "10.18.0.0"
        );
        assert_eq!(
            call(&root, "GET", "/api/nothing", Some(&token), "").status,
            404
        );
        assert_eq!(
            call(&root, "PATCH", "/api/clusters", Some(&token), "").status,
            405
        );
        assert_eq!(call(&root, "GET", "/api/docs", None, "").status, 200);
    }

    /// Every route of the table is in the OpenAPI document and vice versa.
    #[test]
    fn openapi_document_matches_the_route_table() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is valid JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let mut documented = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "parameters")
            {
                let p = path.trim_end_matches('/');
                documented.push((method.to_uppercase(), p.to_string()));
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
        // Protected routes declare their security scheme, public ones none.
        for r in ROUTES {
            let key = doc["paths"]
                .as_object()
                .unwrap()
                .keys()
                .find(|k| k.trim_end_matches('/') == r.path)
                .unwrap();
            let op = &doc["paths"][key][r.method.to_lowercase()];
            let sec = op["security"]
                .as_array()
                .map(|a| a.len())
                .unwrap_or(usize::MAX);
            match r.access {
                Public => assert_eq!(sec, 0, "{} {} must have security: []", r.method, r.path),
                _ => assert!(sec == usize::MAX || sec > 0, "{} {}", r.method, r.path),
            }
            let desc = op["description"].as_str().unwrap_or_default().to_string()
                + op["summary"].as_str().unwrap_or_default();
            if r.access == Cluster {
                assert_eq!(
                    op["security"][0]["joinToken"],
                    json!([]),
                    "{} {} needs the join token",
                    r.method,
                    r.path
                );
            }
            assert!(!desc.is_empty(), "{} {} has no summary", r.method, r.path);
        }
    }

    #[test]
    fn applications_and_services_lifecycle() {
        let (root, sent) = root();
        let (t, _) = login(&root);
        let sla = include_str!("testdata/clientsrvr.json");
        let r = call(&root, "POST", "/api/application", Some(&t), sla);
        assert_eq!(r.status, 200, "{:?}", r.value());
        let apps = r.value();
        let aid = apps[0]["_id"]["$oid"].as_str().unwrap().to_string();
        assert_eq!(apps[0]["applicationID"], aid.as_str());
        assert_eq!(apps[0]["userId"], "Admin");
        assert_eq!(apps[0]["microservices"].as_array().unwrap().len(), 2);
        let again = call(&root, "POST", "/api/application/", Some(&t), sla);
        assert_eq!(again.status, 409, "{:?}", again.value());
        let svcs = call(&root, "GET", &format!("/api/services/{aid}"), Some(&t), "").value();
        let nginx = svcs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["microservice_name"] == "nginx")
            .unwrap()
            .clone();
        assert_eq!(nginx["job_name"], "clientsrvr.test.nginx.test");
        assert_eq!(
            (nginx["virtualization"].as_str(), nginx["RR_ip"].as_str()),
            (Some("docker"), Some("10.30.30.30"))
        );
        assert!(nginx.get("status").is_none());
        let curl = svcs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["microservice_name"] == "curl")
            .unwrap()
            .clone();
        assert_eq!(curl["RR_ip"], "10.30.0.1", "auto-allocated");
        let sid = nginx["microserviceID"].as_str().unwrap().to_string();

        // No cluster yet: upstream's negative status, 200.
        let r = call(
            &root,
            "POST",
            &format!("/api/service/{sid}/instance"),
            Some(&t),
            "",
        );
        assert_eq!(
            (r.status, r.value()["status"].as_str()),
            (200, Some("TargetClusterNotActive"))
        );
        let reg = call(
            &root,
            "POST",
            "/api/clusters/register",
            Some("join"),
            r#"{"cluster_name":"c1","manager_port":10100,"cluster_address":"127.0.0.1","vcpus":4,"memory":3500,"virtualization":["docker"]}"#,
        );
        let cid = reg.value()["id"].as_str().unwrap().to_string();
        let r = call(
            &root,
            "POST",
            &format!("/api/service/{sid}/instance"),
            Some(&t),
            "",
        );
        assert_eq!(r.value()["instance_number"], 0);
        assert_eq!(
            sent.lock().unwrap().pop(),
            Some(Outbound::Deploy {
                cluster_id: cid.clone(),
                job_id: sid.clone(),
                instance: 0
            })
        );
        let job = call(&root, "GET", &format!("/api/service/{sid}/"), Some(&t), "").value();
        assert_eq!(job["status"], "CLUSTER_SCHEDULED");
        assert_eq!(job["instance_list"][0]["cluster_id"], cid.as_str());
        assert_eq!(job["instance_list"][0]["instance_ip"], "10.30.0.2");

        // The table query a cluster service manager makes.
        let table = call(
            &root,
            "GET",
            "/api/net/service/ip/10_30_30_30/instances",
            Some("join"),
            "",
        )
        .value();
        assert_eq!(table["job_name"], "clientsrvr.test.nginx.test");
        assert_eq!(table["instance_list"][0]["host_port"], 0);
        // A FAILED instance leaves the table: clients must not route to it.
        let push = format!(
            r#"{{"jobs":[{{"_id":"{sid}","instance_list":[{{"instance_number":0,"status":"FAILED"}}]}}]}}"#
        );
        let r = call(
            &root,
            "POST",
            &format!("/api/information/{cid}/jobs"),
            Some("join"),
            &push,
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let table = call(
            &root,
            "GET",
            "/api/net/service/ip/10_30_30_30/instances",
            Some("join"),
            "",
        )
        .value();
        assert_eq!(table["instance_list"], serde_json::json!([]));
        assert_eq!(
            call(
                &root,
                "GET",
                "/api/net/service/clientsrvr_test_nginx_test/instances",
                Some("join"),
                ""
            )
            .status,
            200
        );

        assert_eq!(
            call(
                &root,
                "DELETE",
                &format!("/api/service/{sid}/instance/5"),
                Some(&t),
                ""
            )
            .status,
            404
        );
        assert_eq!(
            call(
                &root,
                "DELETE",
                &format!("/api/service/{sid}/instance/x"),
                Some(&t),
                ""
            )
            .status,
            400
        );
        assert_eq!(
            call(
                &root,
                "DELETE",
                &format!("/api/service/{sid}/instance/0"),
                Some(&t),
                ""
            )
            .value()["message"],
            "ok"
        );
        assert_eq!(
            sent.lock().unwrap().pop(),
            Some(Outbound::Undeploy {
                cluster_id: cid,
                job_id: sid.clone(),
                instance: 0
            })
        );
        let job = call(&root, "GET", &format!("/api/service/{sid}"), Some(&t), "").value();
        assert_eq!(
            (
                job["status"].as_str(),
                job["instance_list"].as_array().unwrap().len()
            ),
            (Some("UNDEPLOYED"), 0)
        );

        // A taken rr_ip is a 409 naming the field; nothing is created.
        let add = serde_json::json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID": aid,
            "application_name":"clientsrvr","application_namespace":"test","microservices":[
            {"microservice_name":"extra","microservice_namespace":"test","virtualization":"container","code":"x","addresses":{"rr_ip":"10.30.30.30"}}]}]});
        let r = call(&root, "POST", "/api/service", Some(&t), &add.to_string());
        assert_eq!(r.status, 409);
        assert!(
            r.value()["message"]
                .as_str()
                .unwrap()
                .starts_with("applications[0].microservices[0].addresses.rr_ip"),
            "{:?}",
            r.value()
        );
        let mut add = add;
        add["applications"][0]["microservices"][0]["addresses"]["rr_ip"] = json!("10.30.30.31");
        let r = call(&root, "POST", "/api/service/", Some(&t), &add.to_string());
        assert_eq!(r.value()["deployed_services"][0]["service_name"], "extra");
        assert_eq!(
            call(&root, "GET", "/api/services", Some(&t), "")
                .value()
                .as_array()
                .unwrap()
                .len(),
            3
        );

        // PUT keeps services; rename is refused while services exist.
        let r = call(
            &root,
            "PUT",
            &format!("/api/application/{aid}"),
            Some(&t),
            r#"{"application_desc":"new"}"#,
        );
        assert_eq!(r.value()["message"], "Application is updated");
        assert_eq!(
            call(
                &root,
                "GET",
                &format!("/api/application/{aid}"),
                Some(&t),
                ""
            )
            .value()["microservices"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            call(
                &root,
                "PUT",
                &format!("/api/application/{aid}"),
                Some(&t),
                r#"{"application_name":"other"}"#
            )
            .status,
            409
        );

        assert_eq!(
            call(
                &root,
                "DELETE",
                &format!("/api/service/{sid}"),
                Some(&t),
                ""
            )
            .value()["message"],
            "Job deleted"
        );
        assert_eq!(
            call(&root, "GET", &format!("/api/service/{sid}"), Some(&t), "").status,
            404
        );
        assert_eq!(
            call(
                &root,
                "DELETE",
                &format!("/api/application/{aid}"),
                Some(&t),
                ""
            )
            .value()["message"],
            "Application Deleted"
        );
        assert_eq!(
            call(&root, "GET", "/api/applications", Some(&t), "").value(),
            json!([])
        );
        assert_eq!(
            root.db.read(|s| s.ipam.used_count()),
            0,
            "every address returned"
        );
    }

    #[test]
    fn invalid_descriptors_are_422_naming_the_field() {
        let (root, _) = root();
        let (t, _) = login(&root);
        let r = call(
            &root,
            "POST",
            "/api/application",
            Some(&t),
            r#"{"sla_version":"v9","customerID":"x","applications":[]}"#,
        );
        assert_eq!(r.status, 422);
        assert!(r.value()["message"]
            .as_str()
            .unwrap()
            .starts_with("sla_version:"));
        assert_eq!(
            call(&root, "POST", "/api/application", Some(&t), "{").status,
            400
        );
        assert_eq!(root.db.read(|s| s.apps.len()), 0);
    }
}
