//! A real network partition: three `chorus` processes, each in its own
//! network namespace, on the shared store (Cassandra, through relays in
//! this process), and one node cut off from the others and from the store
//! by taking its link down (the side of a partition without the store's
//! quorum). Its clients still reach it over a second link.
//!
//! ```text
//!   root ns: bridge 10.N.0.1:P (relay) ──────────────── 127.0.0.1:9042 (CQL)
//!     │ cluster link (veth)  ns i: eth0 10.N.0.(10+i)  gossip, transport, and
//!     │                              127.0.0.1:P (relay) → 10.N.0.1:P
//!     └ client link (veth)   ns i: eth1 10.N.(1+i).2   HTTP, WebSocket
//! ```
//!
//! Needs root (`ip netns`); traffic stays in namespaces this test makes.

mod procs;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use procs::{api, cql, keyspace, status, try_status, up_members, write_config_with_log, Node};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

const IDS: [&str; 3] = ["part-a", "part-b", "part-c"];
const WAIT: Duration = Duration::from_secs(60);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces, links and bridge of one test; removed on drop.
struct Net {
    tag: String,
    net: u8,
}

impl Net {
    fn new() -> Net {
        let pid = std::process::id();
        let net = Net {
            tag: format!("{}", pid % 100_000),
            net: 100 + (pid % 100) as u8,
        };
        let br = net.bridge();
        ip(&["link", "add", &br, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", net.host()), "dev", &br]);
        ip(&["link", "set", &br, "up"]);
        for i in 0..IDS.len() {
            let ns = net.ns(i);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let (c, k) = (net.cluster_link(i), net.client_link(i));
            ip(&[
                "link", "add", &c, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &c, "master", &br]);
            ip(&["link", "set", &c, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.node_ip(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&[
                "link", "add", &k, "type", "veth", "peer", "name", "eth1", "netns", &ns,
            ]);
            ip(&[
                "addr",
                "add",
                &format!("10.{}.{}.1/24", net.net, i + 1),
                "dev",
                &k,
            ]);
            ip(&["link", "set", &k, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.client_ip(i)),
                "dev",
                "eth1",
            ]);
            ip(&["-n", &ns, "link", "set", "eth1", "up"]);
        }
        net
    }

    fn bridge(&self) -> String {
        format!("chbr{}", self.tag)
    }
    fn ns(&self, i: usize) -> String {
        format!("chorus{}n{i}", self.tag)
    }
    fn cluster_link(&self, i: usize) -> String {
        format!("chc{}n{i}", self.tag)
    }
    fn client_link(&self, i: usize) -> String {
        format!("chk{}n{i}", self.tag)
    }
    /// The root namespace's address on the bridge (the store relay).
    fn host(&self) -> String {
        format!("10.{}.0.1", self.net)
    }
    fn node_ip(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.net, 10 + i)
    }
    fn client_ip(&self, i: usize) -> String {
        format!("10.{}.{}.2", self.net, i + 1)
    }

    /// Node `i` loses the bridge: its peers and the store.
    fn cut(&self, i: usize) {
        ip(&["link", "set", &self.cluster_link(i), "down"]);
    }
    fn heal(&self, i: usize) {
        ip(&["link", "set", &self.cluster_link(i), "up"]);
    }

    fn start(&self, i: usize, config: &Path, store: &str, seed: Option<&str>) -> Node {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(i), env!("CARGO_BIN_EXE_chorus")])
            .env("CHORUS_CLUSTER_LISTEN", format!("{}:0", self.node_ip(i)))
            .env(
                "CHORUS_CLUSTER_TRANSPORT_LISTEN",
                format!("{}:0", self.node_ip(i)),
            )
            .env("CHORUS_STORAGE_SCYLLA_CONTACT_POINTS", store);
        Node::start_as(
            cmd,
            config,
            IDS[i],
            &format!("{}:0", self.client_ip(i)),
            seed,
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..IDS.len() {
            // A veth pair goes with either end; the namespace once unused.
            for link in [self.cluster_link(i), self.client_link(i)] {
                let _ = Command::new("ip").args(["link", "del", &link]).status();
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .status();
    }
}

/// In namespace `ns`, forwards every connection to `127.0.0.1:port` to
/// `to` (the bridge relay), from a thread that entered the namespace, so
/// both sockets are the namespace's: the CQL driver reaches the store at
/// the address the server gives for itself (127.0.0.1) and the port it was
/// told, and a cut link cuts the store.
fn relay_in(ns: &str, port: u16, to: String) {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the namespace");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("in-namespace relay binds");
            tx.send(()).unwrap();
            while let Ok((mut inbound, _)) = l.accept().await {
                let to = to.clone();
                tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
    });
    rx.recv_timeout(WAIT).expect("in-namespace relay started");
}

/// Forwards every connection to `listen` to the CQL server at `to`.
async fn relay(listen: &str, to: String) -> String {
    let l = TcpListener::bind(listen).await.expect("relay binds");
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    addr
}

async fn status_of(config: &Path, addr: &str, key: Option<&str>) -> Result<Value, String> {
    let (c, a, k) = (
        config.to_path_buf(),
        addr.to_string(),
        key.map(str::to_string),
    );
    tokio::task::spawn_blocking(move || try_status(&c, &a, k.as_deref()))
        .await
        .unwrap()
}

/// Waits (bounded) until `ok` holds for node `addr`'s status.
async fn wait_status(config: &Path, addr: &str, what: &str, ok: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        match status_of(config, addr, None).await {
            Ok(s) if ok(&s) => return,
            seen => assert!(Instant::now() < deadline, "{what}: {seen:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn presence(addr: &str, user: &str) -> Value {
    api(addr, "GET", &format!("/api/v1/users/{user}/presence"), None)
        .await
        .1
}

async fn publish(addr: &str, room: &str, text: &str) -> (u16, Value) {
    let body = json!({"sender": "pub", "text": text, "client_id": text});
    api(
        addr,
        "POST",
        &format!("/api/v1/rooms/{room}/messages"),
        Some(body),
    )
    .await
}

/// Publishes until acknowledged (same `client_id`), bounded.
async fn publish_until_acked(addr: &str, room: &str, text: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (st, v) = publish(addr, room, text).await;
        if st == 200 {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{text} not acknowledged: {st} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Node 2 loses its link to the others and to the store. Its writes are
/// refused with a retryable error and none is acknowledged; the majority
/// takes over the room and acknowledges; the cut-off node's only device of
/// erin goes offline at the majority. Once the link is back the nodes agree
/// on one owner, erin is online again, the write retried with its
/// `client_id` is stored once, and history holds every acknowledged
/// message once, in offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_its_peers_and_the_store_acknowledges_nothing() {
    let Some(cql) = cql() else { return };
    let net = Net::new();
    let bridge_relay = relay(&format!("{}:0", net.host()), cql).await;
    let port: u16 = bridge_relay.rsplit(':').next().unwrap().parse().unwrap();
    for i in 0..IDS.len() {
        relay_in(&net.ns(i), port, bridge_relay.clone());
    }
    let store = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with_log(dir.path(), &store, &keyspace(), "warn");
    // A cut-off node's store calls fail after 3 s, not 20.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("request_timeout_ms = 20000", "request_timeout_ms = 3000");
    std::fs::write(&config, text).unwrap();

    let first = net.start(0, &config, &store, None);
    let s = status(&config, &first.addr, None);
    let gossip = s["members"][0]["gossip"].as_str().unwrap().to_string();
    let nodes = [
        first,
        net.start(1, &config, &store, Some(&gossip)),
        net.start(2, &config, &store, Some(&gossip)),
    ];
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    for a in &addrs {
        wait_status(&config, a, "three members up", |s| up_members(s) == IDS).await;
    }

    // A room owned by node 2, and erin's device there.
    let room = (0..)
        .map(|i| format!("island-{i}"))
        .find(|r| {
            let s = status(&config, &addrs[0], Some(&format!("room:{r}")));
            s["owner"]["node"] == IDS[2]
        })
        .unwrap();
    let (st, v) = api(
        &addrs[0],
        "POST",
        "/api/v1/rooms",
        Some(json!({"room": room, "kind": "public", "created_by": "pub"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let mut acked = vec![publish_until_acked(&addrs[0], &room, "before").await];
    let token = procs::token(&config, "erin");
    let _erin = procs::connect_ws(&addrs[2], &token, WAIT)
        .await
        .expect("erin connects");
    let deadline = Instant::now() + WAIT;
    while presence(&addrs[0], "erin").await["devices"] != 1 {
        assert!(Instant::now() < deadline, "erin online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    net.cut(2);
    for a in &addrs[..2] {
        wait_status(&config, a, "the majority without node 2", |s| {
            up_members(s) == IDS[..2]
        })
        .await;
    }
    // The cut-off node acknowledges nothing: a retryable error each time.
    for _ in 0..3 {
        let (st, v) = publish(&addrs[2], &room, "island").await;
        assert_ne!(
            st, 200,
            "a write without the store is not acknowledged: {v}"
        );
        assert_eq!(v["error"]["retryable"], true, "{st} {v}");
    }
    // The majority serves the room, and sees erin's device gone.
    for i in 0..3 {
        acked.push(publish_until_acked(&addrs[i % 2], &room, &format!("majority-{i}")).await);
    }
    let deadline = Instant::now() + WAIT;
    while presence(&addrs[0], "erin").await["status"] != "offline" {
        assert!(Instant::now() < deadline, "erin offline at the majority");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    net.heal(2);
    for a in &addrs {
        wait_status(&config, a, "three members up again", |s| {
            up_members(s) == IDS
        })
        .await;
    }
    let mut owners = Vec::new();
    for a in &addrs {
        let s = status(&config, a, Some(&format!("room:{room}")));
        owners.push(s["owner"]["node"].as_str().unwrap_or("").to_string());
    }
    assert!(owners.iter().all(|o| *o == IDS[2]), "one owner: {owners:?}");
    let island = publish_until_acked(&addrs[2], &room, "island").await;
    acked.push(island.clone());
    // Sent again through another node: the stored one, as a duplicate.
    let again = publish_until_acked(&addrs[0], &room, "island").await;
    assert_eq!(
        (&again["offset"], &again["duplicate"]),
        (&island["offset"], &json!(true))
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let p = presence(&addrs[0], "erin").await;
        if p["status"] != "offline" && p["devices"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "erin online again: {p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (st, page) = api(
        &addrs[1],
        "GET",
        &format!("/api/v1/rooms/{room}/messages?after=0&limit=200"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{page}");
    let stored: Vec<(u64, String)> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut want: Vec<(u64, String)> = acked
        .iter()
        .zip(["before", "majority-0", "majority-1", "majority-2", "island"])
        .map(|(a, t)| (a["offset"].as_u64().unwrap(), t.to_string()))
        .collect();
    want.sort();
    assert_eq!(
        stored, want,
        "every acknowledged message, once, in offset order"
    );
}
