//! A local S3 protocol server (s3s-fs) for benchmarks and manual tests:
//! `elea-s3-test-server --root DIR [--bucket NAME] [--host IP] [--port PORT]`. It prints the store URL and
//! the credentials to export, then serves until SIGINT or SIGTERM.

use std::path::PathBuf;

use elea_store::testing::S3TestServer;

fn usage() -> ! {
    eprintln!("usage: elea-s3-test-server --root DIR [--bucket NAME] [--host IP] [--port PORT]");
    std::process::exit(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut root: Option<PathBuf> = None;
    let mut bucket = "elea".to_string();
    let mut port = 0u16;
    let mut host = std::net::IpAddr::from([127, 0, 0, 1]);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--root" => root = Some(PathBuf::from(v)),
            "--bucket" => bucket = v,
            "--port" => port = v.parse().unwrap_or_else(|_| usage()),
            "--host" => host = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let root = root.unwrap_or_else(|| usage());
    let server = match S3TestServer::start_at(&root, &bucket, (host, port).into()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot start the S3 server: {e}");
            std::process::exit(1);
        }
    };
    println!("url={}", server.url("data"));
    println!(
        "export AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={}",
        S3TestServer::ACCESS_KEY,
        S3TestServer::SECRET_KEY
    );
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    server.stop().await;
}
