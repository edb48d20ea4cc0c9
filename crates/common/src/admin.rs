//! The operator endpoints every service serves: `GET /metrics` (Prometheus,
//! see [`crate::metrics`]), `GET /healthz` (the process runs and answers) and
//! `GET /readyz` (it can do its work: registered in discovery, queue
//! connected, store reachable — whatever the service declared). logic merges
//! [`router`] into its HTTP API; conn and job serve it on a small listener of
//! their own (`admin.addr`, off when empty). The same readiness drives the
//! standard gRPC health service (`grpc.health.v1.Health`) of the gRPC
//! servers.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::metrics::{self, Registry};

/// How long one readiness probe (a store ping, say) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Probe = Arc<dyn Fn() -> ProbeFuture + Send + Sync>;

/// What a service must have to be ready: named conditions it sets itself
/// (`discovery`, `queue`), and probes run on each `/readyz` (`store`).
#[derive(Clone)]
pub struct Health(Arc<Inner>);

struct Inner {
    service: &'static str,
    conditions: Vec<(&'static str, AtomicBool)>,
    probes: Mutex<Vec<(&'static str, Probe)>>,
    grpc: Mutex<Option<(HealthReporter, &'static str)>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("service", &self.0.service)
            .finish_non_exhaustive()
    }
}

impl Health {
    /// `conditions` start false; the service sets each when it holds.
    pub fn new(service: &'static str, conditions: &[&'static str]) -> Self {
        Health(Arc::new(Inner {
            service,
            conditions: conditions
                .iter()
                .map(|c| (*c, AtomicBool::new(false)))
                .collect(),
            probes: Mutex::new(Vec::new()),
            grpc: Mutex::new(None),
        }))
    }

    /// Sets a condition (unknown names are ignored) and updates the gRPC
    /// health status.
    pub async fn set(&self, condition: &str, ok: bool) {
        for (c, v) in &self.0.conditions {
            if *c == condition {
                v.store(ok, Ordering::Relaxed);
            }
        }
        self.sync_grpc().await;
    }

    /// Marks every condition false (shutdown: stop taking traffic).
    pub async fn set_all(&self, ok: bool) {
        for (_, v) in &self.0.conditions {
            v.store(ok, Ordering::Relaxed);
        }
        self.sync_grpc().await;
    }

    /// A check run on each `/readyz` (bounded by [`PROBE_TIMEOUT`]).
    pub fn add_probe<F, Fut>(&self, name: &'static str, probe: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let p: Probe = Arc::new(move || Box::pin(probe()));
        self.0
            .probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, p));
    }

    /// The conditions that do not hold (probes not run).
    pub fn failing_conditions(&self) -> Vec<&'static str> {
        self.0
            .conditions
            .iter()
            .filter(|(_, v)| !v.load(Ordering::Relaxed))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Every condition and probe: `Ok` or what failed, one line each.
    pub async fn check(&self) -> Result<(), Vec<String>> {
        let mut failed: Vec<String> = self
            .failing_conditions()
            .into_iter()
            .map(|c| format!("{c}: not ready"))
            .collect();
        let probes: Vec<(&'static str, Probe)> = self
            .0
            .probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, p) in probes {
            match tokio::time::timeout(PROBE_TIMEOUT, p()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(format!("{name}: {e}")),
                Err(_) => failed.push(format!("{name}: no answer in {PROBE_TIMEOUT:?}")),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed)
        }
    }

    /// A `grpc.health.v1.Health` service whose overall status ("") and the
    /// service's own name follow the conditions: add it to the gRPC server.
    pub async fn grpc_service(
        &self,
        name: &'static str,
    ) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>
    {
        let (reporter, server) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
        *self.0.grpc.lock().unwrap_or_else(|p| p.into_inner()) = Some((reporter, name));
        self.sync_grpc().await;
        server
    }

    async fn sync_grpc(&self) {
        let reporter = self
            .0
            .grpc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some((reporter, name)) = reporter else {
            return;
        };
        let status = if self.failing_conditions().is_empty() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(name, status).await;
    }
}

/// What the admin routes serve.
#[derive(Clone)]
pub struct Admin {
    pub health: Health,
    /// This instance's own families (conn's and job's per-node counters),
    /// rendered after the process-wide ones.
    pub registries: Vec<Arc<Registry>>,
}

/// `GET /metrics`, `GET /healthz`, `GET /readyz`.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(get_healthz))
        .route("/readyz", get(get_readyz))
        .with_state(admin)
}

async fn get_metrics(State(a): State<Admin>) -> Response {
    let regs: Vec<&Registry> = a.registries.iter().map(|r| r.as_ref()).collect();
    let body = metrics::render(&regs);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

async fn get_healthz(State(a): State<Admin>) -> Response {
    (StatusCode::OK, format!("ok {}\n", a.health.0.service)).into_response()
}

async fn get_readyz(State(a): State<Admin>) -> Response {
    match a.health.check().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Err(failed) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", failed.join("\n")),
        )
            .into_response(),
    }
}

/// Serves [`router`] on `listener` until `stop`; returns the bound address.
pub fn spawn(
    listener: TcpListener,
    admin: Admin,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let app = router(admin);
    tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "admin listener failed");
        }
    });
    tracing::info!(%addr, "admin listener: http://{addr}/metrics /healthz /readyz");
    Ok(addr)
}

/// [`spawn`] when there is a listener (`admin.addr` set); logs a failure.
pub fn spawn_opt(
    listener: Option<TcpListener>,
    health: &Health,
    registries: Vec<Arc<Registry>>,
    stop: CancellationToken,
) {
    let Some(l) = listener else { return };
    let admin = Admin {
        health: health.clone(),
        registries,
    };
    if let Err(e) = spawn(l, admin, stop) {
        tracing::warn!(error = %e, "admin listener not started");
    }
}

/// Binds the `admin.addr` of `cfg` (invalid addresses were refused when the
/// config was validated).
pub fn bind_config(cfg: &crate::config::AdminConfig) -> std::io::Result<Option<TcpListener>> {
    let addr = cfg
        .socket_addr()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    bind(addr)
}

/// Binds `admin.addr` when set (empty: no listener). A std listener, so it
/// can be bound before a runtime exists; converted when served.
pub fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("admin.addr = {addr}: {e}")))?;
    l.set_nonblocking(true)?;
    Ok(Some(TcpListener::from_std(l)?))
}
