//! Entry point: parse the command line, load the configuration (exit 64 on
//! any problem, before a socket is bound), then run the chosen command.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sendtalk_relay::cli::{self, SenderKey};
use sendtalk_relay::config::{AuthMode, Settings, CONFIG_FILE_ENV};
use sendtalk_relay::spool::{EntryState, PageQuery};
use sendtalk_relay::{shutdown, startup::Application, telemetry};

/// BSD `EX_USAGE`: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

/// Edge relay for SendTalk WhatsApp Verification webhooks.
///
/// Authenticates each webhook with SendTalk's secret key, validates it,
/// deduplicates it by verification id (Redis) and publishes it to a RabbitMQ
/// exchange with publisher confirms, spooling to disk while the broker is
/// unavailable. Without a configuration file it runs on embedded defaults:
/// loopback only, in-memory dedup, events printed on standard output, and the
/// development secret `dev-secret`.
///
/// Configuration layers: built-in defaults < TOML file (--config or
/// SENDTALK_RELAY_CONFIG) < environment SENDTALK_RELAY__SECTION__KEY.
#[derive(Debug, Parser)]
#[command(name = "sendtalk-relay", version, about, long_about)]
struct Cli {
    /// TOML configuration file (see config.example.toml).
    #[arg(long, short, global = true, env = CONFIG_FILE_ENV, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay (the default command).
    Serve,
    /// Validate the configuration and print it as TOML with secrets redacted.
    CheckConfig,
    /// Read a body on standard input and print the headers a sender attaches.
    Sign {
        /// hmac-sha256, standard-webhooks or secret-header (default: configured).
        #[arg(long, value_name = "M")]
        mode: Option<AuthMode>,
        /// Header name (default: configured auth.header, else the mode's default).
        #[arg(long, value_name = "H")]
        header: Option<String>,
        /// Secret key (default: the first configured secret).
        #[arg(long, value_name = "S")]
        secret: Option<String>,
    },
    /// POST a freshly signed sample event to the relay and print the answer.
    SendTest {
        /// Webhook URL (default: the configured listener and path).
        #[arg(long)]
        url: Option<String>,
        /// Secret key (default: the first configured secret).
        #[arg(long, value_name = "S")]
        secret: Option<String>,
        /// Verification id (default: a random UUID).
        #[arg(long)]
        id: Option<String>,
    },
    /// GET /healthz on the configured admin listener; exit 0 on 200, 1
    /// otherwise, within 2 s (what a container's health check runs).
    Healthcheck,
    /// See, retry and drop what the spool holds (a running relay's admin
    /// API, or a stopped relay's file with `list --dir`).
    ///
    /// Exit 0; 1 when the entry does not exist or the relay refuses; 69
    /// when the relay cannot be reached.
    Spool {
        /// Admin listener URL (default: the configured admin.listen).
        #[arg(long, global = true, value_name = "URL")]
        admin: Option<String>,
        /// Bearer token (default: the first of admin.tokens / admin.token_files).
        #[arg(
            long,
            global = true,
            value_name = "T",
            env = "SENDTALK_RELAY_ADMIN_TOKEN"
        )]
        token: Option<String>,
        #[command(subcommand)]
        action: SpoolAction,
    },
}

#[derive(Debug, Subcommand)]
enum SpoolAction {
    /// List entries oldest first: key, state, attempts, age, last error (no
    /// body, no phone number).
    List {
        /// Only entries in this state: waiting, held or dead.
        #[arg(long, value_name = "S", value_parser = cli::spool::parse_state)]
        state: Option<EntryState>,
        /// Entries per page, 1 to 1000.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        /// Start after this key (the `more: --after` of the previous page).
        #[arg(long, value_name = "KEY")]
        after: Option<u64>,
        /// Read a stopped relay's spool directory (read-only) instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Show one entry with its body, message properties and headers.
    Show {
        /// The entry's key, as `list` shows it.
        key: String,
    },
    /// Attempt an entry (dead or waiting) now, with its attempts reset.
    Retry {
        /// The entry's key, as `list` shows it.
        key: String,
    },
    /// Delete an entry; it will never be published.
    Drop {
        /// The entry's key, as `list` shows it.
        key: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref(), std::env::vars()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sendtalk-relay: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::CheckConfig => {
            print!("{}", settings.redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Sign {
            mode,
            header,
            secret,
        } => sign(&settings, mode, header, secret),
        Command::SendTest { url, secret, id } => send_test(&settings, url, secret, id),
        Command::Healthcheck => healthcheck(&settings),
        Command::Spool {
            admin,
            token,
            action,
        } => spool(&settings, admin, token, action),
    }
}

fn spool(
    settings: &Settings,
    admin: Option<String>,
    token: Option<String>,
    action: SpoolAction,
) -> ExitCode {
    use cli::spool::{Failure, Operation};
    let operation = match action {
        SpoolAction::List {
            state,
            limit,
            after,
            dir,
        } => {
            let query = PageQuery {
                state,
                after,
                limit: usize::from(limit),
            };
            if let Some(dir) = dir {
                return finish(cli::spool::list_dir(settings, &dir, query));
            }
            Operation::List(query)
        }
        SpoolAction::Show { key } => Operation::Show(key),
        SpoolAction::Retry { key } => Operation::Retry(key),
        SpoolAction::Drop { key } => Operation::Drop(key),
    };
    let base = admin.unwrap_or_else(|| cli::spool::admin_base(settings));
    let token = token.or_else(|| {
        use secrecy::ExposeSecret as _;
        settings
            .admin
            .tokens
            .first()
            .map(|t| t.expose_secret().to_string())
    });
    let result = runtime()
        .map_err(|e| Failure::Unreachable(format!("cannot start a runtime: {e}")))
        .and_then(|rt| rt.block_on(cli::spool::run(&base, token.as_deref(), &operation)));
    finish(result)
}

fn finish(result: Result<String, cli::spool::Failure>) -> ExitCode {
    match result {
        Ok(out) => {
            println!("{}", out.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sendtalk-relay spool: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn healthcheck(settings: &Settings) -> ExitCode {
    let url = cli::healthz_url(settings);
    let checked = runtime()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(cli::healthcheck(&url)));
    match checked {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sendtalk-relay healthcheck: {url}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn serve(settings: Settings) -> ExitCode {
    telemetry::init(&settings.log);
    if settings.embedded {
        // Name the effective values: the environment may have replaced any
        // of the embedded defaults.
        tracing::warn!(
            sink = ?settings.sink,
            dedup = ?settings.dedup.backend(),
            listen = %settings.http.listen,
            auth_mode = settings.auth.mode.as_str(),
            dev_secret = settings.using_dev_secret,
            "no configuration file: embedded defaults apply to every key the environment does not set{}",
            if settings.using_dev_secret { "; accepting the public development secret" } else { "" }
        );
    }
    for ignored in &settings.ignored_keys {
        tracing::warn!(
            choice = ignored.because,
            ignored = ignored.keys.join(", "),
            "an explicit demo choice is honoured; the keys of the real backend are ignored"
        );
    }
    let result = runtime().map_err(anyhow::Error::from).and_then(|rt| {
        let result = rt.block_on(async {
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown::on_signal()).await
        });
        // A blocking task stuck on a stalled disk (a spool read) must not
        // hold the exit: dropping the runtime would wait for it.
        rt.shutdown_timeout(std::time::Duration::from_secs(1));
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "sendtalk-relay failed");
            eprintln!("sendtalk-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn sign(
    settings: &Settings,
    mode: Option<AuthMode>,
    header: Option<String>,
    secret: Option<String>,
) -> ExitCode {
    let key = match SenderKey::resolve(settings, mode, header, secret) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("sendtalk-relay sign: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        eprintln!("sendtalk-relay sign: cannot read standard input: {e}");
        return ExitCode::FAILURE;
    }
    for (name, value) in key.headers(&body) {
        println!("{name}: {value}");
    }
    ExitCode::SUCCESS
}

fn send_test(
    settings: &Settings,
    url: Option<String>,
    secret: Option<String>,
    id: Option<String>,
) -> ExitCode {
    let key = match SenderKey::resolve(settings, None, None, secret) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("sendtalk-relay send-test: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let url = url.unwrap_or_else(|| cli::default_url(settings));
    let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let status = settings
        .webhook
        .accepted_statuses
        .first()
        .map_or("verified", String::as_str);
    let body = cli::sample_event(&id, status);
    let result = runtime()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(cli::post_signed(&url, &key, body)));
    match result {
        Ok((code, text)) => {
            println!("{code} {text}");
            if (200..300).contains(&code) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("sendtalk-relay send-test: {e:#}");
            ExitCode::FAILURE
        }
    }
}
