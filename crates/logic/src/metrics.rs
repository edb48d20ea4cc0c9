//! logic's Prometheus families (process-wide, `chatroom_logic_*`): HTTP
//! requests by route and code with latency, gRPC calls by method (sign-ins
//! among them), rate-limit refusals, store query latency and errors,
//! presence backend errors. Queue publishing is counted by the shared
//! publisher (`chatroom_queue_*`). Served on logic's HTTP listener at
//! `GET /metrics`.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use chatroom_common::metrics::{
    Counter, DynLabels, Family, Histogram, HistogramFamily, latency_family, with_global,
};

/// gRPC methods of `chatroom.logic.Logic` (the label values; anything else
/// is `other`).
pub const GRPC_METHODS: &[&str] = &[
    "SignIn",
    "SignOut",
    "Heartbeat",
    "Receive",
    "ReceiveMany",
    "ReportOnline",
    "Chat",
    "Pending",
    "AckPending",
    "Undelivered",
    "RoomHistory",
    "other",
];

#[derive(Debug)]
pub struct LogicMetrics {
    /// HTTP requests by route (the matched pattern) and status code.
    pub http_requests: Family<DynLabels, Counter>,
    /// HTTP latency by route.
    pub http_latency: HistogramFamily<DynLabels>,
    /// gRPC calls handled, by method (pre-created, indexed like `GRPC_METHODS`).
    pub grpc_calls: Vec<Counter>,
    /// gRPC calls answered with a non-OK status, by method.
    pub grpc_errors: Vec<Counter>,
    pub grpc_latency: Vec<Histogram>,
    /// SignIn calls (conn asking logic to admit a session).
    pub sign_ins: Counter,
    /// Requests refused by a per-user rate limit.
    pub rate_limited: Counter,
    pub store_queries: Counter,
    pub store_errors: Counter,
    pub store_latency: Histogram,
    pub presence_errors: Counter,
}

pub static LOGIC: LazyLock<LogicMetrics> = LazyLock::new(|| {
    let grpc_calls_f = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    let grpc_errors_f = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    let grpc_latency_f: HistogramFamily<Vec<(&'static str, &'static str)>> = latency_family();
    let m = LogicMetrics {
        http_requests: Family::default(),
        http_latency: latency_family(),
        grpc_calls: GRPC_METHODS
            .iter()
            .map(|n| grpc_calls_f.get_or_create_owned(&vec![("method", *n)]))
            .collect(),
        grpc_errors: GRPC_METHODS
            .iter()
            .map(|n| grpc_errors_f.get_or_create_owned(&vec![("method", *n)]))
            .collect(),
        grpc_latency: GRPC_METHODS
            .iter()
            .map(|n| grpc_latency_f.get_or_create_owned(&vec![("method", *n)]))
            .collect(),
        sign_ins: Counter::default(),
        rate_limited: Counter::default(),
        store_queries: Counter::default(),
        store_errors: Counter::default(),
        store_latency: Histogram::latency(),
        presence_errors: Counter::default(),
    };
    with_global(|r| {
        let r = r.sub_registry_with_prefix("logic");
        r.register(
            "http_requests",
            "HTTP requests by route and status code",
            m.http_requests.clone(),
        );
        r.register(
            "http_request_seconds",
            "HTTP request latency by route",
            m.http_latency.clone(),
        );
        r.register("grpc_calls", "gRPC calls by method", grpc_calls_f);
        r.register(
            "grpc_errors",
            "gRPC calls answered with a non-OK status, by method",
            grpc_errors_f,
        );
        r.register(
            "grpc_call_seconds",
            "gRPC call latency by method",
            grpc_latency_f,
        );
        r.register("sign_ins", "SignIn calls from conn", m.sign_ins.clone());
        r.register(
            "rate_limited",
            "Requests refused by a per-user rate limit",
            m.rate_limited.clone(),
        );
        r.register("store_queries", "Store operations", m.store_queries.clone());
        r.register(
            "store_errors",
            "Store operations that failed in the database",
            m.store_errors.clone(),
        );
        r.register(
            "store_query_seconds",
            "Store operation latency",
            m.store_latency.clone(),
        );
        r.register(
            "presence_errors",
            "Presence backend (Redis) errors",
            m.presence_errors.clone(),
        );
    });
    m
});

/// Index of a gRPC path's method in [`GRPC_METHODS`].
pub fn grpc_method_index(path: &str) -> usize {
    let name = path.rsplit('/').next().unwrap_or("");
    GRPC_METHODS
        .iter()
        .position(|m| *m == name)
        .unwrap_or(GRPC_METHODS.len() - 1)
}

/// Times one store operation (recorded when dropped).
pub struct StoreTimer(Instant);

impl StoreTimer {
    pub fn start() -> Self {
        StoreTimer(Instant::now())
    }
}

impl Drop for StoreTimer {
    fn drop(&mut self) {
        let m = &*LOGIC;
        m.store_queries.inc();
        m.store_latency.observe_duration(self.0.elapsed());
    }
}

/// A tower layer for the gRPC server: counts and times each call by
/// method; a call answered with a `grpc-status` other than 0 in its headers
/// (a trailers-only error) counts as an error.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<axum::http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = GrpcFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        GrpcFuture {
            method: grpc_method_index(req.uri().path()),
            started: Instant::now(),
            inner: self.inner.call(req),
        }
    }
}

/// The call's future, recording when it completes (no allocation).
pub struct GrpcFuture<F> {
    inner: F,
    method: usize,
    started: Instant,
}

impl<F, RB, E> std::future::Future for GrpcFuture<F>
where
    F: std::future::Future<Output = Result<axum::http::Response<RB>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let r = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll(cx));
        let (i, m) = (self.method, &*LOGIC);
        m.grpc_calls[i].inc();
        if i == 0 {
            m.sign_ins.inc();
        }
        m.grpc_latency[i].observe_duration(self.started.elapsed());
        let failed = match &r {
            Ok(resp) => resp
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() != b"0"),
            Err(_) => true,
        };
        if failed {
            m.grpc_errors[i].inc();
        }
        std::task::Poll::Ready(r)
    }
}

/// The routes of logic's router (matched patterns), whose series are
/// created at start-up so that counting a request takes no lock and
/// allocates nothing; a route missing here still counts, through the
/// family's lookup.
pub const HTTP_ROUTES: &[&str] = &[
    "/msg",
    "/tk",
    "/user/register",
    "/user/login",
    "/user/find",
    "/contact/addfriend",
    "/contact/friend",
    "/contact/loadfriend",
    "/contact/createcommunity",
    "/contact/community",
    "/contact/loadcommunity",
    "/contact/joincommunity",
    "/chat/history",
    "/attach/upload",
    "/attach/files/{name}",
    "/admin/broadcast",
    "unmatched",
];

/// Status codes with a pre-created series per route.
const HTTP_CODES: &[u16] = &[200, 400, 401, 403, 404, 405, 413, 415, 429, 500, 503];

struct RouteHandles {
    route: &'static str,
    by_code: Vec<Counter>,
    latency: Histogram,
}

static ROUTES: LazyLock<Vec<RouteHandles>> = LazyLock::new(|| {
    let m = &*LOGIC;
    HTTP_ROUTES
        .iter()
        .map(|route| RouteHandles {
            route,
            by_code: HTTP_CODES
                .iter()
                .map(|code| {
                    m.http_requests.get_or_create_owned(&vec![
                        ("route", route.to_string()),
                        ("code", code.to_string()),
                    ])
                })
                .collect(),
            latency: m
                .http_latency
                .get_or_create_owned(&vec![("route", route.to_string())]),
        })
        .collect()
});

/// Creates every pre-registered series now (logic start-up).
pub fn init() {
    LazyLock::force(&ROUTES);
}

/// Records one HTTP request.
pub fn record_http(route: &str, code: u16, took: Duration) {
    let known = ROUTES.iter().find(|h| h.route == route);
    let counted = known
        .and_then(|h| {
            let i = HTTP_CODES.iter().position(|c| *c == code)?;
            h.by_code[i].inc();
            Some(())
        })
        .is_some();
    let m = &*LOGIC;
    if !counted {
        m.http_requests
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("code", code.to_string()),
            ])
            .inc();
    }
    match known {
        Some(h) => h.latency.observe_duration(took),
        None => m
            .http_latency
            .get_or_create(&vec![("route", route.to_string())])
            .observe_duration(took),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route of the API router has its series pre-created (else its
    /// requests would take the family's lock).
    #[test]
    fn every_api_route_is_pre_registered() {
        let sources = [
            include_str!("http.rs"),
            include_str!("im/routes.rs"),
            include_str!("im/upload.rs"),
        ];
        let mut found = 0;
        for src in sources {
            for part in src.split(".route(\"").skip(1) {
                let route = part.split('"').next().unwrap();
                assert!(
                    HTTP_ROUTES.contains(&route),
                    "{route} missing in HTTP_ROUTES"
                );
                found += 1;
            }
        }
        assert!(found >= 16, "{found}");
    }

    #[test]
    fn grpc_paths_map_to_their_method() {
        assert_eq!(grpc_method_index("/chatroom.logic.Logic/SignIn"), 0);
        assert_eq!(
            GRPC_METHODS[grpc_method_index("/chatroom.logic.Logic/ReceiveMany")],
            "ReceiveMany"
        );
        assert_eq!(
            GRPC_METHODS[grpc_method_index("/grpc.health.v1.Health/Check")],
            "other"
        );
    }
}
