//! Real Redis and nginx for the replica tests, each on a free loopback
//! port, started here and stopped when dropped (scripts/setup-services
//! installs Debian's packages).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A port for a server that cannot bind port 0 and report it (redis-server,
/// redis-sentinel, nginx): one that nobody listens on now, picked at random
/// below the kernel's ephemeral range. No port-0 bind and no outgoing
/// connection of a test running beside this one can be handed it between
/// this look and the server's own bind; a clash with another test's pick
/// is what [`Redis::start`] retries.
pub(crate) fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000u16, ephemeral.saturating_sub(10_000).max(1000));
    let random = RandomState::new();
    (0u64..)
        .map(|attempt| low + (random.hash_one(attempt) % u64::from(span)) as u16)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port")
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
        loop {
            let mut redis = Self {
                child: None,
                port: free_port(),
            };
            // Another server took the port first: pick another.
            if redis.spawn().await {
                return redis;
            }
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server on `self.port`: false when another server has it.
    async fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server runs (run scripts/setup-services)");
        let pid = child.id().expect("a pid").to_string();
        self.child = Some(child);
        wait_for_port(self.port, "redis-server").await;
        // What answers on the port is this server, or this one has exited.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on {} neither answered nor exited",
                self.port
            );
            let info = cli_at(self.port, &["INFO", "server"]).await;
            if info
                .lines()
                .any(|l| l.trim() == format!("process_id:{pid}"))
            {
                return true;
            }
            if let Some(child) = &mut self.child
                && child.try_wait().expect("redis-server's status").is_some()
            {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
        assert!(
            self.spawn().await,
            "port {} taken while restarting",
            self.port
        );
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
    /// The one process nginx runs as here (`master_process off`).
    pub(crate) child: Child,
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
            "master_process off;\n\
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
        // One process (`master_process off`): killing it leaves no worker
        // behind.
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

/// `redis-cli` against the server on `port`.
pub(crate) async fn cli_at(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A scratch directory for servers that write files, gone when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sluicegate-{what}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("a scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn redis_server(args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server runs (run scripts/setup-services)")
}

fn memory_only(port: u16, dir: &Scratch) -> Vec<String> {
    [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        &dir.0.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A Redis Cluster of three masters (no replicas), made with
/// `redis-cli --cluster create` and waited for until every node says the
/// cluster is ok.
pub(crate) struct RedisCluster {
    nodes: Vec<Child>,
    /// Each node's command line, to start it again.
    args: Vec<Vec<String>>,
    pub(crate) ports: Vec<u16>,
    _dir: Scratch,
}

impl RedisCluster {
    pub(crate) async fn start() -> Self {
        let dir = Scratch::new("cluster");
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        let mut every_args = Vec::new();
        for _ in 0..3 {
            let (port, bus) = (free_port(), free_port());
            let mut args = memory_only(port, &dir);
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                ]
                .map(str::to_owned),
            );
            nodes.push(redis_server(&args));
            every_args.push(args);
            ports.push(port);
        }
        for port in &ports {
            wait_for_port(*port, "a cluster node").await;
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli runs");
        assert!(
            created.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self {
            nodes,
            args: every_args,
            ports,
            _dir: dir,
        };
        cluster.until_ok().await;
        cluster
    }

    async fn until_ok(&self) {
        for port in &self.ports {
            until(Duration::from_secs(20), || async {
                cli_at(*port, &["CLUSTER", "INFO"])
                    .await
                    .contains("cluster_state:ok")
            })
            .await;
        }
    }

    /// SIGKILLs master `at` and starts it again empty (nothing is saved):
    /// its `nodes.conf` brings it back with the same slots.
    pub(crate) async fn restart_empty(&mut self, at: usize) {
        let node = &mut self.nodes[at];
        node.start_kill().expect("a cluster node to kill");
        node.wait().await.expect("the node exits");
        self.nodes[at] = redis_server(&self.args[at]);
        wait_for_port(self.ports[at], "the restarted node").await;
        self.until_ok().await;
    }

    /// `redis+cluster://` naming every node.
    pub(crate) fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }
}

/// A primary, its replica, and one sentinel watching them as `mymaster`
/// (quorum 1), ready to fail over: the sentinel knows the replica.
pub(crate) struct SentinelSet {
    /// The primary, the replica and the sentinel, in that order.
    servers: Vec<Child>,
    pub(crate) primary: u16,
    pub(crate) replica: u16,
    pub(crate) sentinel: u16,
    _dir: Scratch,
}

impl SentinelSet {
    pub(crate) async fn start() -> Self {
        let dir = Scratch::new("sentinel");
        let (primary, replica, sentinel) = (free_port(), free_port(), free_port());
        let mut servers = vec![redis_server(&memory_only(primary, &dir))];
        wait_for_port(primary, "the primary").await;
        let mut args = memory_only(replica, &dir);
        args.extend(["--replicaof", "127.0.0.1", &primary.to_string()].map(str::to_owned));
        servers.push(redis_server(&args));
        until(Duration::from_secs(20), || async {
            cli_at(replica, &["INFO", "replication"])
                .await
                .contains("master_link_status:up")
        })
        .await;
        let conf = dir.0.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "bind 127.0.0.1\nport {sentinel}\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 5000\n",
                dir.0.display()
            ),
        )
        .expect("sentinel.conf");
        servers.push(
            Command::new("redis-sentinel")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("redis-sentinel runs (run scripts/setup-services)"),
        );
        wait_for_port(sentinel, "redis-sentinel").await;
        until(Duration::from_secs(30), || async {
            cli_at(sentinel, &["SENTINEL", "REPLICAS", "mymaster"])
                .await
                .contains(&replica.to_string())
        })
        .await;
        Self {
            servers,
            primary,
            replica,
            sentinel,
            _dir: dir,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/mymaster", self.sentinel)
    }

    /// SIGKILL to the first primary, waited for.
    pub(crate) async fn kill_primary(&mut self) {
        let _ = self.servers[0].kill().await;
    }

    /// The port of the primary the sentinel names now.
    pub(crate) async fn named_primary(&self) -> u16 {
        let reply = cli_at(
            self.sentinel,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        )
        .await;
        reply
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Every key on the server at `port` has an expiry: nothing a generation
/// wrote stays forever. How many keys there were.
pub(crate) async fn every_key_expires_at(port: u16) -> usize {
    let keys = cli_at(port, &["--scan"]).await;
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    for key in &keys {
        let ttl: i64 = cli_at(port, &["PTTL", key])
            .await
            .parse()
            .expect("a number");
        // -2: expired between the scan and the look.
        assert!(ttl > 0 || ttl == -2, "{key} has no expiry ({ttl})");
    }
    keys.len()
}
