//! Real Redis and nginx for the replica tests, each on a free loopback
//! port, started here and stopped when dropped (scripts/setup-services
//! installs Debian's packages).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A port nobody listens on now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn wait_for_port(port: u16, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not listen on {port} (run scripts/setup-services)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `redis-server` with no persistence: a restart loses everything, the
/// worst case for the instances.
pub(crate) struct Redis {
    child: Option<Child>,
    pub(crate) port: u16,
}

impl Redis {
    pub(crate) async fn start() -> Self {
        let mut redis = Self {
            child: None,
            port: free_port(),
        };
        redis.spawn().await;
        redis
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server runs (run scripts/setup-services)");
        self.child = Some(child);
        wait_for_port(self.port, "redis-server").await;
    }

    /// Kills the server and waits until it is gone.
    pub(crate) async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port, empty.
    pub(crate) async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    /// A raw command through `redis-cli`, for checks from outside.
    pub(crate) async fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

/// nginx in front of some instances, with the README's configuration
/// (`deploy/nginx.conf`) and only the ports changed.
pub(crate) struct Nginx {
    child: Child,
    dir: PathBuf,
    pub(crate) base: String,
}

impl Nginx {
    pub(crate) async fn start(instances: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("sluicegate-nginx-{port}"));
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let site = include_str!("../../deploy/nginx.conf");
        let servers: String = instances
            .iter()
            .map(|base| {
                let addr = base.trim_start_matches("http://");
                format!("    server {addr};\n")
            })
            .collect();
        let site = site
            .replace(
                "    server 127.0.0.1:8081;\n    server 127.0.0.1:8082;\n",
                &servers,
            )
            .replace(
                "listen 127.0.0.1:8080;",
                &format!("listen 127.0.0.1:{port};"),
            );
        assert!(
            site.contains(&servers),
            "the deploy config names its instances"
        );
        let d = dir.display();
        let main = format!(
            "worker_processes 1;\n\
             daemon off;\n\
             error_log {d}/error.log warn;\n\
             pid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             access_log off;\n\
             client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             {site}\n\
             }}\n"
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, main).expect("nginx.conf");
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx runs (run scripts/setup-services)");
        wait_for_port(port, "nginx").await;
        Self {
            child,
            dir,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGKILL leaves the workers to notice their master is gone; a
        // QUIT through the pid file stops them all at once.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("nginx.pid")) {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", pid.trim()])
                .status();
        }
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `check` holds, asking again every few milliseconds.
pub(crate) async fn until<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
