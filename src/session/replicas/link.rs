//! The connections to Redis, however it is deployed:
//!
//! - one server, `redis://` or `rediss://`;
//! - a primary watched by Sentinel, `redis+sentinel://host:port[,host:port…]/<service>[/db]`:
//!   the primary is asked of the sentinels at start and on every renewal
//!   round, and the connections move to a new one after a failover;
//! - a Cluster, `redis+cluster://host:port[,host:port…]` (`rediss+cluster://`
//!   with TLS): commands go to the node of their key's slot, and channels
//!   are sharded (`SPUBLISH`/`SSUBSCRIBE`), each in its generation's slot.
//!
//! User and password in the URL are those of the Redis nodes (not of the
//! sentinels). Every connection is lazy: an instance starts while Redis is
//! away and connects once it is there.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, RedisError,
    RedisFuture, RedisResult, TlsCertificates, Value,
};
use tokio::sync::{Mutex as AsyncMutex, OnceCell, mpsc};

/// Where Redis is, as `--redis` names it.
#[derive(Debug)]
enum Target {
    Server(ConnectionInfo),
    Cluster(Vec<ConnectionInfo>),
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        service: String,
        node: redis::RedisConnectionInfo,
    },
}

/// Splits `scheme://[user[:password]@]host:port[,host:port…][/path]` into
/// its user part, its hosts and its path.
fn split_hosts(rest: &str) -> (Option<&str>, Vec<&str>, &str) {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (user, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (Some(user), hosts),
        None => (None, authority),
    };
    let hosts = hosts.split(',').filter(|h| !h.is_empty()).collect();
    (user, hosts, path)
}

fn info(url: &str) -> Result<ConnectionInfo, String> {
    url.into_connection_info()
        .map_err(|e| format!("--redis: {e}"))
        .map(|info| {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            info.set_redis_settings(settings)
        })
}

fn parse(url: &str) -> Result<Target, String> {
    let at = |user: Option<&str>| user.map(|u| format!("{u}@")).unwrap_or_default();
    if let Some((scheme, rest)) = url
        .strip_prefix("redis+cluster://")
        .map(|r| ("redis", r))
        .or_else(|| url.strip_prefix("rediss+cluster://").map(|r| ("rediss", r)))
    {
        let (user, hosts, _) = split_hosts(rest);
        if hosts.is_empty() {
            return Err("--redis: a cluster URL names at least one node".into());
        }
        let nodes = hosts
            .iter()
            .map(|host| info(&format!("{scheme}://{}{host}", at(user))))
            .collect::<Result<_, _>>()?;
        return Ok(Target::Cluster(nodes));
    }
    if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        let (user, hosts, path) = split_hosts(rest);
        let mut path = path.split('/');
        let service = path.next().unwrap_or_default().to_owned();
        if hosts.is_empty() || service.is_empty() {
            return Err(
                "--redis: a Sentinel URL is redis+sentinel://host:port[,host:port]/<service>[/db]"
                    .into(),
            );
        }
        let db = path.next().filter(|d| !d.is_empty()).unwrap_or("0");
        let node = info(&format!("redis://{}localhost/{db}", at(user)))?
            .redis_settings()
            .clone();
        let sentinels = hosts
            .iter()
            .map(|host| info(&format!("redis://{host}")))
            .collect::<Result<_, _>>()?;
        return Ok(Target::Sentinel {
            sentinels,
            service,
            node,
        });
    }
    info(url).map(Target::Server)
}

fn not_connected(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, what))
}

/// A Cluster connection, made on first use (and tried again on the next
/// use when that failed).
pub(super) struct LazyCluster {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// One connection to Redis, whatever the deployment.
#[derive(Clone)]
pub(super) enum Conn {
    Server(ConnectionManager),
    Cluster(Arc<LazyCluster>),
    /// Sentinel has not named a primary yet.
    Unknown,
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(conn) => conn.req_packed_command(cmd),
            Self::Cluster(lazy) => {
                let lazy = Arc::clone(lazy);
                Box::pin(async move { lazy.get().await?.req_packed_command(cmd).await })
            }
            Self::Unknown => Box::pin(async { Err(not_connected("no Redis primary known yet")) }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(lazy) => {
                let lazy = Arc::clone(lazy);
                Box::pin(async move {
                    lazy.get()
                        .await?
                        .req_packed_commands(pipeline, offset, count)
                        .await
                })
            }
            Self::Unknown => Box::pin(async { Err(not_connected("no Redis primary known yet")) }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(conn) => conn.get_db(),
            Self::Cluster(_) | Self::Unknown => 0,
        }
    }
}

impl Conn {
    /// Listens on a channel: a sharded one on a Cluster.
    pub(super) async fn subscribe(&mut self, channel: String) -> RedisResult<()> {
        match self {
            Self::Server(conn) => conn.subscribe(channel).await,
            Self::Cluster(lazy) => lazy.get().await?.ssubscribe(channel).await,
            Self::Unknown => Err(not_connected("no Redis primary known yet")),
        }
    }

    pub(super) async fn unsubscribe(&mut self, channel: String) -> RedisResult<()> {
        match self {
            Self::Server(conn) => conn.unsubscribe(channel).await,
            Self::Cluster(lazy) => lazy.get().await?.sunsubscribe(channel).await,
            Self::Unknown => Ok(()),
        }
    }
}

/// What a look at the sentinels found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Primary {
    /// As before (or no Sentinel).
    Same,
    /// The first primary named: connections made.
    Named,
    /// A failover: connections moved to a new primary.
    Moved,
}

#[derive(Clone)]
struct Pair {
    conn: Conn,
    subscriber: Conn,
    /// The primary these connect to, under Sentinel.
    primary: Option<String>,
}

/// How connections are made and timed.
pub(super) struct LinkConfig {
    pub(super) timeout: Duration,
    pub(super) ca: Option<Vec<u8>>,
}

/// The connections of one instance: commands on one, subscriptions (whose
/// messages go to `pushes`) on the other.
pub(super) struct Link {
    current: RwLock<Pair>,
    sentinel: Option<AsyncMutex<SentinelClient>>,
    cluster: bool,
    config: LinkConfig,
    pushes: mpsc::UnboundedSender<PushInfo>,
}

impl Link {
    pub(super) fn open(
        url: &str,
        config: LinkConfig,
        pushes: mpsc::UnboundedSender<PushInfo>,
    ) -> Result<Self, String> {
        let certificates = |ca: &Vec<u8>| TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        };
        let (pair, sentinel, cluster) = match parse(url)? {
            Target::Server(info) => {
                let client = match &config.ca {
                    Some(ca) => redis::Client::build_with_tls(info, certificates(ca)),
                    None => redis::Client::open(info),
                }
                .map_err(|e| format!("--redis: {e}"))?;
                (Self::server_pair(client, &config, &pushes)?, None, false)
            }
            Target::Cluster(nodes) => {
                let builder = |push: bool| {
                    let mut builder = ClusterClientBuilder::new(nodes.clone())
                        .use_protocol(ProtocolVersion::RESP3)
                        .connection_timeout(config.timeout)
                        .response_timeout(config.timeout)
                        .retries(2)
                        .max_retry_wait(500);
                    if let Some(ca) = &config.ca {
                        builder = builder.certs(certificates(ca));
                    }
                    if push {
                        builder = builder.push_sender(pushes.clone());
                    }
                    builder.build().map_err(|e| format!("--redis: {e}"))
                };
                let lazy = |client| {
                    Conn::Cluster(Arc::new(LazyCluster {
                        client,
                        conn: OnceCell::new(),
                    }))
                };
                let pair = Pair {
                    conn: lazy(builder(false)?),
                    subscriber: lazy(builder(true)?),
                    primary: None,
                };
                (pair, None, true)
            }
            Target::Sentinel {
                sentinels,
                service,
                node,
            } => {
                let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(node);
                let client = SentinelClient::build(
                    sentinels,
                    service,
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(|e| format!("--redis: {e}"))?;
                let pair = Pair {
                    conn: Conn::Unknown,
                    subscriber: Conn::Unknown,
                    primary: None,
                };
                (pair, Some(AsyncMutex::new(client)), false)
            }
        };
        Ok(Self {
            current: RwLock::new(pair),
            sentinel,
            cluster,
            config,
            pushes,
        })
    }

    fn server_pair(
        client: redis::Client,
        config: &LinkConfig,
        pushes: &mpsc::UnboundedSender<PushInfo>,
    ) -> Result<Pair, String> {
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager.clone())
            .map_err(|e| format!("--redis: {e}"))?;
        let subscriber = ConnectionManager::new_lazy_with_config(
            client,
            manager
                .set_push_sender(pushes.clone())
                .set_automatic_resubscription(),
        )
        .map_err(|e| format!("--redis: {e}"))?;
        Ok(Pair {
            conn: Conn::Server(conn),
            subscriber: Conn::Server(subscriber),
            primary: None,
        })
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Pair> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection for commands.
    pub(super) fn conn(&self) -> Conn {
        self.current().conn.clone()
    }

    /// The connection that subscribes.
    pub(super) fn subscriber(&self) -> Conn {
        self.current().subscriber.clone()
    }

    /// The command that publishes to a channel: sharded on a Cluster.
    pub(super) fn is_cluster(&self) -> bool {
        self.cluster
    }

    pub(super) fn publish(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    /// What commands on `key` must share a pipeline with: on a Cluster the
    /// key's hash tag (one slot), elsewhere anything goes together.
    pub(super) fn group_of<'a>(&self, key: &'a str) -> &'a str {
        if !self.cluster {
            return "";
        }
        key.split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
            .map_or(key, |(tag, _)| tag)
    }

    /// Under Sentinel, asks which node is the primary now and moves the
    /// connections there when it changed.
    pub(super) async fn refresh(&self) -> Result<Primary, String> {
        let Some(sentinel) = &self.sentinel else {
            return Ok(Primary::Same);
        };
        let client = {
            let mut sentinel = sentinel.lock().await;
            tokio::time::timeout(self.config.timeout * 2, sentinel.async_get_client())
                .await
                .map_err(|_| "the sentinels did not answer in time".to_owned())?
                .map_err(|e| e.to_string())?
        };
        let primary = client.get_connection_info().addr().to_string();
        let before = self.current().primary.clone();
        if before.as_deref() == Some(primary.as_str()) {
            return Ok(Primary::Same);
        }
        let mut pair = Self::server_pair(client, &self.config, &self.pushes)?;
        pair.primary = Some(primary.clone());
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = pair;
        tracing::info!(%primary, "Redis primary named by Sentinel");
        Ok(match before {
            None => Primary::Named,
            Some(_) => Primary::Moved,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_server_a_cluster_or_a_sentinel_set() {
        assert!(matches!(
            parse("redis://127.0.0.1:6379"),
            Ok(Target::Server(_))
        ));
        let Ok(Target::Cluster(nodes)) = parse("redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001")
        else {
            panic!("a cluster URL");
        };
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].addr().to_string(), "10.0.0.2:7001");
        assert_eq!(nodes[0].redis_settings().password(), Some("p"));
        let Ok(Target::Sentinel {
            sentinels,
            service,
            node,
        }) = parse("redis+sentinel://:secret@h1:26379,h2:26380/mymaster/2")
        else {
            panic!("a sentinel URL");
        };
        assert_eq!(sentinels.len(), 2);
        assert_eq!(sentinels[0].redis_settings().password(), None);
        assert_eq!(service, "mymaster");
        assert_eq!(node.password(), Some("secret"));
        assert_eq!(node.db(), 2);
        assert!(parse("redis+sentinel://h1:26379").is_err());
        assert!(parse("redis+cluster://").is_err());
    }

    #[tokio::test]
    async fn cluster_commands_group_by_hash_tag() {
        let (pushes, _) = mpsc::unbounded_channel();
        let config = || LinkConfig {
            timeout: Duration::from_secs(1),
            ca: None,
        };
        let cluster = Link::open("redis+cluster://127.0.0.1:1", config(), pushes.clone())
            .expect("a cluster link");
        assert_eq!(cluster.group_of("sg:{abc}:m"), "abc");
        assert_eq!(cluster.group_of("sg:plain"), "sg:plain");
        assert_eq!(cluster.publish(), "SPUBLISH");
        let server = Link::open("redis://127.0.0.1:1", config(), pushes).expect("a link");
        assert_eq!(server.group_of("sg:{abc}:m"), "");
        assert_eq!(server.publish(), "PUBLISH");
    }
}
