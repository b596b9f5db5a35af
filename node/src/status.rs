//! `chorus status`: asks a node for `GET /api/v1/cluster` and prints it.

use std::fmt::Write as _;

use anyhow::Context;

use crate::api_cluster::ClusterStatus;
use crate::Config;

/// `node.listen` as a client reaches it (a wildcard host becomes loopback).
pub fn local_target(config: &Config) -> String {
    match config.listen_addr() {
        Ok(addr) if addr.ip().is_unspecified() => format!("127.0.0.1:{}", addr.port()),
        Ok(addr) => addr.to_string(),
        Err(_) => config.node.listen.clone(),
    }
}

pub async fn run(target: &str, api_key: &str, key: Option<&str>, json: bool) -> anyhow::Result<()> {
    let mut url = format!("http://{target}/api/v1/cluster");
    if let Some(k) = key {
        url.push_str("?key=");
        url.push_str(&percent_encode(k));
    }
    let resp = reqwest::Client::new()
        .get(&url)
        .header("x-api-key", api_key)
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("asking {target} (is a node listening there?)"))?;
    let status = resp.status();
    let body = resp.text().await.context("reading the answer")?;
    if !status.is_success() {
        anyhow::bail!("{target} answered {status}: {body}");
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let s: ClusterStatus = serde_json::from_str(&body).context("decoding the answer")?;
    print!("{}", render(&s));
    Ok(())
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The table `chorus status` prints.
pub fn render(s: &ClusterStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {} (generation {}); {} member(s), owners: {}",
        s.node,
        s.generation,
        s.members.len(),
        s.view.join(" ")
    );
    let _ = writeln!(
        out,
        "{:<20} {:<8} {:<22} {:<22} {:>7} {:>7} {:>7}",
        "ID", "STATE", "HTTP", "GOSSIP", "CONNS", "ROOMS", "USERS"
    );
    for m in &s.members {
        let state = serde_json::to_value(m.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let gossip = if m.gossip.port() == 0 {
            "-".to_string()
        } else {
            m.gossip.to_string()
        };
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:<22} {:<22} {:>7} {:>7} {:>7}",
            m.id.as_str(),
            state,
            m.http.as_deref().unwrap_or("-"),
            gossip,
            m.load.connections,
            m.load.rooms,
            m.load.users
        );
    }
    if let Some(o) = &s.owner {
        let _ = writeln!(out, "owner of {}: {}", o.key, o.node);
    }
    let _ = writeln!(
        out,
        "this node: {} connections, {} rooms and {} users active",
        s.local.connections, s.local.rooms, s.local.users
    );
    out
}
