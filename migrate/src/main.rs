use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = migrate::Cli::parse();
    std::process::exit(migrate::run(cli).await);
}
