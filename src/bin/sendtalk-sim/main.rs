//! `sendtalk-sim`: a stand-in for SendTalk's WhatsApp Verification API
//! (SPEC 10), for tests, demos and the compose stack. It is written from
//! SendTalk's documentation and documented examples (`shared/fixtures/`),
//! never from the relay's code: it uses nothing of the `sendtalk_relay`
//! library, so that a misunderstanding in the relay cannot be mirrored here.
//!
//! Endpoints:
//! - `POST /api/v1/verification/create_whatsapp_verification` (`api.rs`):
//!   header `API-Key`, body `{userPhone, languageCode, expiryMinutes,
//!   appURL?}`; always an envelope `{status, error {code, message, field},
//!   data}` unless a fault is asked for. Triggers by the last four digits of
//!   `userPhone`: `0000` invalid_recipient, `0001` insufficient_balance,
//!   `0002` config_disabled, `0003` HTTP 500, `0004` non-JSON body, `0005`
//!   slow (`--slow-phone-delay-ms`). Flags `--create-delay-ms` and
//!   `--create-fault http-500|not-json` apply to every create.
//! - `POST /sim/verifications/{id}/complete` (`control.rs`), optional body
//!   `{"userPhone": "..."}`: POSTs `{id, userPhone, status: "verified",
//!   verifiedTime}` to `--webhook-url`, retried with backoff (`delivery.rs`);
//!   answers 200 (delivered) or 502 with `{id, userPhone, verifiedTime,
//!   delivered, attempts, finalStatus, finalError, finalResponseBody}`;
//!   404 for an unknown id.
//! - `GET /sim/deliveries[?verificationId=…]`: every attempt, `[{verificationId,
//!   attempt, url, status, error, responseBody, at, durationMs}]`.
//! - `GET /healthz`: 200 `{"status":"ok"}`.
//!
//! Layout: `cli.rs` flags and settings; `api.rs` the create endpoint;
//! `message.rs` waMessage, waLink and the QR code; `delivery.rs` the webhook
//! and its retries; `control.rs` the `/sim` endpoints; `state.rs` what is
//! remembered in memory.

mod api;
mod cli;
mod control;
mod delivery;
mod message;
mod state;

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use crate::cli::Cli;
use crate::state::AppState;

/// BSD `EX_USAGE`: the flags are wrong; nothing was bound.
const EXIT_USAGE: u8 = 64;
/// A `complete` still delivering at shutdown gets this long to finish; a
/// simulator has nothing durable to protect, so the wait is short.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Two workers are plenty for a test double, and keep it light next to the
/// relay on a small machine.
const WORKERS: usize = 2;

fn main() -> ExitCode {
    let settings = match Cli::parse().into_settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sendtalk-sim: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logs();
    match actix_web::rt::System::new().block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sendtalk-sim failed");
            eprintln!("sendtalk-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why the simulator could not run.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("server error: {0}")]
    Serve(#[from] std::io::Error),
}

async fn run(settings: cli::Settings) -> Result<(), RunError> {
    let addr = settings.listen;
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| RunError::Bind { addr, source })?;
    let local = listener.local_addr()?;
    let client = reqwest::Client::builder()
        .user_agent(concat!("sendtalk-sim/", env!("CARGO_PKG_VERSION")))
        .build()?;
    // The one start-up line: where it listens and where webhooks go; the
    // API key and the secret are never logged. Tests read `listen=` from it.
    tracing::info!(
        listen = %local,
        webhook_url = %settings.webhook.url,
        auth_mode = ?settings.webhook.mode,
        header = %settings.webhook.header,
        wa_number = %settings.wa_number,
        "sendtalk-sim listening"
    );
    let state = web::Data::new(AppState::new(settings, client));
    HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route(api::CREATE_PATH, web::post().to(api::create))
            .route(
                "/sim/verifications/{id}/complete",
                web::post().to(control::complete),
            )
            .route("/sim/deliveries", web::get().to(control::deliveries))
            .route("/healthz", web::get().to(control::healthz))
    })
    .workers(WORKERS)
    .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
    .listen(listener)?
    .run()
    .await?;
    Ok(())
}

/// Logs on standard error; `RUST_LOG` overrides the `info` default. Colours
/// only on a terminal, so that a test reading the start-up line sees plain
/// `listen=ADDR`.
fn init_logs() {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
