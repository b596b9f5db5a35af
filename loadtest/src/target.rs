//! Where connections go and where they come from.
//!
//! Targets are restricted to 127.0.0.0/8: this harness generates load, and
//! load only ever goes to this machine. Connection `i` goes to target
//! `i mod targets` from source address `i mod sources`, so every target and
//! every source gets its share whatever process opens the connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Why an address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("`{0}` is not an ip:port address (names other than localhost are not resolved)")]
    Unparsable(String),
    #[error(
        "refusing target `{0}`: chorus-loadtest only sends load to loopback addresses (127.0.0.0/8)"
    )]
    NotLoopback(String),
    #[error("source addresses must be in 127.0.0.0/8; {0} sources from {1} leave it")]
    SourcesOutOfRange(usize, Ipv4Addr),
    #[error("no target given")]
    NoTarget,
}

/// Parses `ip:port` or `localhost:port`, accepting 127.0.0.0/8 only.
pub fn parse_target(s: &str) -> Result<SocketAddr, AddressError> {
    let s = s.trim();
    let addr: SocketAddr = match s.strip_prefix("localhost:") {
        Some(port) => port
            .parse::<u16>()
            .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
            .map_err(|_| AddressError::Unparsable(s.to_string()))?,
        None => s
            .parse()
            .map_err(|_| AddressError::Unparsable(s.to_string()))?,
    };
    if !is_loopback_v4(addr.ip()) {
        return Err(AddressError::NotLoopback(s.to_string()));
    }
    Ok(addr)
}

fn is_loopback_v4(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(_) => false,
    }
}

/// `n` source addresses from `base` upward, skipping host parts .0 and .255.
pub fn source_addrs(base: Ipv4Addr, n: usize) -> Result<Vec<Ipv4Addr>, AddressError> {
    if base.octets()[0] != 127 {
        return Err(AddressError::NotLoopback(base.to_string()));
    }
    let mut out = Vec::with_capacity(n);
    let mut cur = u32::from(base);
    while out.len() < n {
        let ip = Ipv4Addr::from(cur);
        if ip.octets()[0] != 127 {
            return Err(AddressError::SourcesOutOfRange(n, base));
        }
        let last = ip.octets()[3];
        if last != 0 && last != 255 {
            out.push(ip);
        }
        cur = cur
            .checked_add(1)
            .ok_or(AddressError::SourcesOutOfRange(n, base))?;
    }
    Ok(out)
}

/// How many source addresses to use when not told: each holds about 28,000
/// ephemeral ports here, so one per 16,000 connections leaves room for
/// sockets in TIME_WAIT; at least 4 so that spreading is always exercised.
pub fn auto_sources(connections: u64) -> usize {
    (connections.div_ceil(16_000) as usize).max(4)
}

/// The targets and source addresses of a run.
#[derive(Clone, Debug)]
pub struct Placement {
    pub targets: Vec<SocketAddr>,
    pub sources: Vec<Ipv4Addr>,
}

impl Placement {
    pub fn new(targets: &[String], sources: Vec<Ipv4Addr>) -> Result<Placement, AddressError> {
        if targets.is_empty() {
            return Err(AddressError::NoTarget);
        }
        let targets = targets
            .iter()
            .map(|t| parse_target(t))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Placement { targets, sources })
    }

    /// The node connection `i` goes to.
    pub fn target(&self, i: u64) -> SocketAddr {
        self.targets[(i % self.targets.len() as u64) as usize]
    }

    /// The local address connection `i` binds before connecting (none: let the kernel choose).
    pub fn source(&self, i: u64) -> Option<IpAddr> {
        if self.sources.is_empty() {
            return None;
        }
        Some(IpAddr::V4(
            self.sources[(i % self.sources.len() as u64) as usize],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_accepted() {
        assert_eq!(parse_target("127.0.0.1:80").unwrap().port(), 80);
        assert_eq!(
            parse_target("127.3.2.1:9").unwrap().ip(),
            Ipv4Addr::new(127, 3, 2, 1)
        );
        assert_eq!(
            parse_target("localhost:7").unwrap(),
            "127.0.0.1:7".parse().unwrap()
        );
        for bad in [
            "10.0.0.1:80",
            "192.168.1.2:80",
            "8.8.8.8:53",
            "[::1]:80",
            "0.0.0.0:80",
        ] {
            assert!(
                matches!(parse_target(bad), Err(AddressError::NotLoopback(_))),
                "{bad} accepted"
            );
        }
        assert!(matches!(
            parse_target("example.com:80"),
            Err(AddressError::Unparsable(_))
        ));
        assert!(matches!(
            parse_target("127.0.0.1"),
            Err(AddressError::Unparsable(_))
        ));
        let err = Placement::new(&["127.0.0.1:1".into(), "172.16.0.1:1".into()], vec![]);
        assert!(err.unwrap_err().to_string().contains("127.0.0.0/8"));
    }

    #[test]
    fn sources_stay_in_loopback_and_skip_network_and_broadcast() {
        let s = source_addrs(Ipv4Addr::new(127, 0, 0, 254), 3).unwrap();
        assert_eq!(
            s,
            vec![
                Ipv4Addr::new(127, 0, 0, 254),
                Ipv4Addr::new(127, 0, 1, 1),
                Ipv4Addr::new(127, 0, 1, 2)
            ]
        );
        assert!(source_addrs(Ipv4Addr::new(127, 255, 255, 250), 10).is_err());
        assert!(source_addrs(Ipv4Addr::new(10, 0, 0, 1), 1).is_err());
    }

    #[test]
    fn connections_spread_round_robin() {
        let p = Placement::new(
            &["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            source_addrs(Ipv4Addr::new(127, 0, 0, 2), 3).unwrap(),
        )
        .unwrap();
        let ports: Vec<u16> = (0..4).map(|i| p.target(i).port()).collect();
        assert_eq!(ports, vec![1, 2, 1, 2]);
        let srcs: Vec<String> = (0..4).map(|i| p.source(i).unwrap().to_string()).collect();
        assert_eq!(
            srcs,
            vec!["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.2"]
        );
        assert_eq!(auto_sources(10), 4);
        assert_eq!(auto_sources(100_000), 7);
    }
}
