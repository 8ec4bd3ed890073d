//! The three HTTP listeners: the public webhook, the admin endpoints and the
//! lifecycle API. Each is bound here, before it serves, so a taken port is a
//! start-up error and the real port (port 0 in tests) is known.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use anyhow::Context as _;

use crate::config::{ServerTls, Settings};
use crate::routes::admin::{self, AdminState};
use crate::routes::spool;
use crate::routes::webhook::{self, Relay};

/// Headers must arrive within this; slow-loris connections are cut.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound listener serving, and where it listens.
pub(super) struct Bound {
    pub addr: SocketAddr,
    pub server: Server,
}

fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("Failed to bind {key} {addr}"))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("Failed to read the address of {key}"))?;
    Ok((listener, local))
}

/// `http.listen`: the webhook path and JSON 404/405 for everything else,
/// with TLS when configured.
pub(super) fn webhook(settings: &Settings, relay: web::Data<Relay>) -> anyhow::Result<Bound> {
    let (listener, addr) = bind(settings.http.listen, "http.listen")?;
    let path = settings.http.webhook_path.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(relay.clone())
            .service(
                web::resource(path.as_str())
                    .route(web::post().to(webhook::receive))
                    .default_service(web::to(webhook::method_not_allowed)),
            )
            .default_service(web::to(webhook::not_found))
    });
    let server = match settings.http.tls.as_ref().map(ServerTls::server_config) {
        Some(config) => server.listen_rustls_0_23(listener, config),
        None => server.listen(listener),
    };
    let server = server
        .context("Failed to listen on http.listen")?
        .disable_signals()
        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
        .shutdown_timeout(settings.shutdown.grace.as_secs())
        .run();
    Ok(Bound { addr, server })
}

/// `admin.listen`: liveness, readiness, metrics and the spool operations,
/// on one worker.
pub(super) fn admin(settings: &Settings, state: web::Data<AdminState>) -> anyhow::Result<Bound> {
    let (listener, addr) = bind(settings.admin.listen, "admin.listen")?;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/healthz", web::get().to(admin::healthz))
            .route("/readyz", web::get().to(admin::readyz))
            .route("/metrics", web::get().to(admin::metrics))
            .service(
                web::resource("/spool")
                    .route(web::get().to(spool::list))
                    .default_service(web::to(spool::method_not_allowed)),
            )
            .service(
                web::resource("/spool/{key}")
                    .route(web::get().to(spool::show))
                    .route(web::delete().to(spool::drop_entry))
                    .default_service(web::to(spool::method_not_allowed)),
            )
            .service(
                web::resource("/spool/{key}/retry")
                    .route(web::post().to(spool::retry))
                    .default_service(web::to(spool::method_not_allowed)),
            )
    })
    .workers(1)
    .listen(listener)
    .context("Failed to listen on admin.listen")?
    .disable_signals()
    .shutdown_timeout(1)
    .run();
    Ok(Bound { addr, server })
}

/// `api.listen`: the lifecycle API and its OpenAPI document (SPEC 9).
pub(super) fn api(
    settings: &Settings,
    lifecycle: Arc<crate::api::Lifecycle>,
) -> anyhow::Result<Bound> {
    use crate::api::{openapi, routes};
    let (listener, addr) = bind(settings.api.listen, "api.listen")?;
    let data = web::Data::from(lifecycle);
    let document = web::Data::new(openapi::document(&settings.http.webhook_path));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(document.clone())
            .service(
                web::resource("/v1/verifications")
                    .route(web::post().to(routes::create))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .service(
                web::resource("/v1/verifications/{id}")
                    .route(web::get().to(routes::status))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .route(
                "/openapi.json",
                web::get().to(|doc: web::Data<String>| async move {
                    actix_web::HttpResponse::Ok()
                        .content_type("application/json")
                        .body(doc.get_ref().clone())
                }),
            )
            .default_service(web::to(routes::not_found))
    })
    .workers(2)
    .listen(listener)
    .context("Failed to listen on api.listen")?
    .disable_signals()
    .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
    .shutdown_timeout(settings.shutdown.grace.as_secs())
    .run();
    Ok(Bound { addr, server })
}
