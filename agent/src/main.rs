//! `kvmagent serve`: the daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

use kvmagent::app::App;
use kvmagent::config::Config;
use kvmagent::http::server;
use kvmagent::notify::Notifier;

/// A per-host KVM agent: serves a ZStack-compatible command API over HTTP and carries the
/// commands out with libvirt, QEMU and qemu-img.
#[derive(Parser)]
#[command(name = "kvmagent", version = concat!(env!("CARGO_PKG_VERSION"), " (sources ", env!("KVMAGENT_SOURCE_ID"), ")"))]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or SIGINT.
    Serve {
        /// TOML configuration file; every key has a default, so it may be omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log as JSON lines instead of human-readable text.
        #[arg(long)]
        json_logs: bool,
    },
    /// Print the effective configuration (defaults merged with the file) and exit.
    ShowConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List the command paths the agent serves.
    Paths,
    /// Print the OpenAPI document of the native API (as served at `GET /api`).
    Openapi,
    /// Check that this host can run the agent's work: one line per check, each problem with its
    /// fix. Exit code 0 ready, 1 degraded, 2 not ready.
    CheckHost {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Forget the management node learned at the first `/host/connect`: the next connect is
    /// trusted again (to move a host to another management node).
    ForgetManagementNode {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Send one command to the running agent and print its result. Exit code 0 success, 1 the
    /// command failed, 2 a usage or transport error.
    Call {
        /// The command path, e.g. /host/echo or /vm/create.
        path: String,
        /// The JSON body, from a file or `-` for stdin (default `{}`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print the whole result as pretty JSON.
        #[arg(long)]
        json: bool,
        /// Poll GET /task/<id> for the result instead of receiving it by callback.
        #[arg(long)]
        poll: bool,
        #[command(flatten)]
        connect: kvmagent::cli::Connect,
    },
    /// The native VM operations as commands (each goes through `call`).
    Vm {
        #[command(subcommand)]
        command: kvmagent::cli::vm::VmCommand,
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        connect: kvmagent::cli::Connect,
    },
    /// An end-to-end pass against the running agent: every step timed, everything it made
    /// removed (also on failure or SIGINT/SIGTERM). Exit code 0 only when every step passed.
    Smoke {
        #[command(flatten)]
        options: kvmagent::cli::smoke::SmokeOptions,
        #[command(flatten)]
        connect: kvmagent::cli::Connect,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, json_logs } => {
            init_logging(json_logs);
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "agent stopped with an error");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ShowConfig { config } => match Config::load(config.as_deref()) {
            Ok(mut c) => {
                if c.server.token.is_some() {
                    c.server.token = Some("<redacted>".into());
                }
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::ForgetManagementNode { config } => {
            let forgotten = Config::load(config.as_deref()).map_err(|e| e.to_string()).and_then(|c| {
                kvmagent::trusted_sources::TrustedSources::forget(&c.state_dir).map_err(|e| e.to_string())
            });
            match forgotten {
                Ok(true) => println!("forgotten: the next /host/connect is trusted"),
                Ok(false) => println!("no management node was remembered"),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Command::CheckHost { config, json } => check_host(config.as_deref(), json),
        Command::Openapi => {
            println!("{:#}", kvmagent::http::openapi::document());
            ExitCode::SUCCESS
        }
        Command::Call { path, data, json, poll, connect } => {
            let body = match data.as_deref().map(kvmagent::cli::vm::read_body).transpose() {
                Ok(b) => b.unwrap_or_else(|| serde_json::json!({})),
                Err(e) => return e.exit(),
            };
            kvmagent::cli::call::run(&connect, &path, &body, poll, json)
        }
        Command::Vm { command, json, connect } => match command.request() {
            Ok((path, body)) => kvmagent::cli::call::run(&connect, path, &body, false, json),
            Err(e) => e.exit(),
        },
        Command::Smoke { options, connect } => {
            let prepared = connect.load_config().and_then(|c| Ok((connect.target(&c)?, c)));
            match prepared {
                Ok((target, config)) => {
                    kvmagent::cli::runtime().block_on(kvmagent::cli::smoke::run(target, &config, &options))
                }
                Err(e) => e.exit(),
            }
        }
        Command::Paths => {
            for (path, style) in kvmagent::http::routes::paths() {
                println!("{style:?}\t{path}");
            }
            ExitCode::SUCCESS
        }
    }
}

fn check_host(config: Option<&std::path::Path>, json: bool) -> ExitCode {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let checks = runtime.block_on(kvmagent::check_host::run(&config));
    let verdict = kvmagent::check_host::verdict(&checks);
    if json {
        println!("{}", serde_json::json!({"verdict": verdict, "checks": checks}));
    } else {
        for c in &checks {
            println!("{}", c.line());
        }
        println!("host: {}", serde_json::to_value(verdict).unwrap_or_default().as_str().unwrap_or_default());
    }
    ExitCode::from(verdict.exit_code())
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVMAGENT_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    for root in &config.storage.roots {
        std::fs::create_dir_all(root).map_err(|e| format!("cannot create storage root {}: {e}", root.display()))?;
    }
    kvmagent::process::set_low_priority_copies(config.tasks.low_priority_copies);
    let listen = config.server.listen;
    let ceph_listen = config.ceph.agent_listen;
    let retention = Duration::from_secs(config.tasks.retention_secs);
    let tls = config.server.tls.as_ref().map(kvmagent::http::tls::acceptor).transpose()?;
    let (app, inherited) = App::new(config)?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, "kvmagent listening");
    let mut listeners = vec![server::Listener { tcp: listener, tls: tls.clone(), scope: server::Scope::All }];
    if let Some(addr) = ceph_listen {
        let tcp = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            format!("cannot listen on {addr} for the Ceph agent paths: {e}; set ceph.agent_listen or \"off\"")
        })?;
        tracing::info!(listen = %addr, "serving the Ceph agent paths");
        listeners.push(server::Listener { tcp, tls, scope: server::Scope::CephAgent });
    }

    // What a previous run left is rolled back or resumed, and its results are delivered, while
    // the agent already answers: undoing can wait on Ceph to time out a killed client's lock.
    // The interrupted tasks stay running meanwhile, so their resources are not reused.
    {
        let app = app.clone();
        tokio::spawn(async move {
            let report = kvmagent::recovery::recover(&app, inherited, &kvmagent::http::runner::TaskRunner).await;
            let _ = app.recovery.set(report);
        });
    }
    let pruner = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                app.tasks.prune(retention).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        })
    };

    let notifier = std::sync::Arc::new(Notifier::from_env());
    notifier.notify(&format!("READY=1\nSTATUS=serving on {listen}"));
    let watchdog = notifier.watchdog_interval().map(|every| {
        let notifier = notifier.clone();
        tokio::spawn(async move {
            loop {
                notifier.notify("WATCHDOG=1");
                tokio::time::sleep(every).await;
            }
        })
    });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stopping = notifier.clone();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        stopping.notify("STOPPING=1\nSTATUS=stopping: running tasks wind down");
    };
    server::serve(app, listeners, shutdown).await;
    pruner.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("kvmagent stopped");
    Ok(())
}
