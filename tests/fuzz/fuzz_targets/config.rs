//! The config loader: a `cluster.toml` text, then environment overrides,
//! then validation and what the node derives from a valid config, as `chorus
//! serve` runs them (`Config::load` reads the file as UTF-8 text first).
//!
//! Input: the TOML text, then optionally a 0 byte and the environment, one
//! variable a line: the line's first byte picks the variable from
//! `ENV_OVERRIDES` (the only ones the node reads), the rest is its value.
#![no_main]

use std::collections::HashMap;

use chorus_node::config::{Config, ENV_OVERRIDES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (text, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let env: HashMap<String, String> = env
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let (&var, value) = line.split_first()?;
            let (name, _, _) = ENV_OVERRIDES[usize::from(var) % ENV_OVERRIDES.len()];
            Some((name.to_string(), String::from_utf8(value.to_vec()).ok()?))
        })
        .collect();
    let Ok(mut config) = Config::from_toml(text) else {
        return;
    };
    if config.apply_env(&env).is_err() || config.validate().is_err() {
        return;
    }
    config
        .listen_addr()
        .expect("a valid config has a listen address");
    let node_id = config.node_id();
    config.actor_config(node_id);
});
