use clap::Parser;
use conveyor::cli::{Cli, Command, RoleArgs};
use conveyor::{Role, ops};
use conveyor_config::Settings;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn settings(cli: &Cli, args: &RoleArgs) -> anyhow::Result<Settings> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(dir) = &args.data_dir {
        settings.data_dir = dir.clone();
    }
    if let Some(listen) = args.listen {
        settings.listen = listen;
    }
    Ok(settings)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let role = match &cli.command {
        None => Some((Role::Serve, RoleArgs::default())),
        Some(Command::Serve(a)) => Some((Role::Serve, a.clone())),
        Some(Command::Ingest(a)) => Some((Role::Ingest, a.clone())),
        Some(Command::Process(a)) => Some((Role::Process, a.clone())),
        Some(Command::Transcode(a)) => Some((Role::Transcode, a.clone())),
        Some(Command::Project(a)) => Some((Role::Project, a.clone())),
        Some(Command::Query(a)) => Some((Role::Query, a.clone())),
        Some(Command::Archive(a)) => Some((Role::Archive, a.clone())),
        _ => None,
    };
    if let Some((role, args)) = role {
        let settings = settings(&cli, &args)?;
        let telemetry =
            conveyor_runtime::telemetry::init(&settings.telemetry, role.service_name())?;
        let served = async {
            let app = conveyor::build(settings, role).await?;
            conveyor_runtime::shutdown::cancel_on_signal(app.stop_token());
            tracing::info!(role = ?role, port = app.port(), data_dir = %app.settings.data_dir.display(), "conveyor listening");
            println!(
                "conveyor {role:?} listening on http://{}:{}",
                app.settings.listen.ip(),
                app.port()
            );
            app.run_until_stopped().await
        }
        .await;
        // Sends the spans still queued; it blocks, so off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        return served;
    }
    match cli.command {
        Some(Command::Ops(cmd)) => ops::run(&cli.config, cmd).await,
        Some(Command::Loadtest { args }) => conveyor::cli::run_loadtest(&args),
        Some(Command::Openapi) => {
            print!("{}", conveyor::openapi::to_json());
            Ok(())
        }
        Some(Command::Healthcheck { url }) => {
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(3))
                .build()?;
            let status = client.get(&url).send().await?.status();
            anyhow::ensure!(status.is_success(), "{url} answered {status}");
            Ok(())
        }
        _ => unreachable!("roles are handled above"),
    }
}
