//! The webhook replay cache (`webhooks.state_dir`): event ids already applied,
//! so a replayed or redelivered event changes nothing twice.
//!
//! How long, and why: an id is remembered for `webhooks.replay_retention`
//! (default 7 days), at most `webhooks.replay_max_entries` (default 1 000 000,
//! the oldest going first). Vendors redeliver for up to about 3 days (SendGrid
//! 72 h, HubSpot 3 days, Mailchimp 75 minutes), so a genuine retry always finds
//! its id; the signed timestamps of SendGrid, Klaviyo and HubSpot already stop
//! a captured request from being replayed after `max_age`. Only Twilio and
//! Mandrill sign no time: a request captured from them could be replayed after
//! the retention — replaying an opt-out re-applies a denial the patient once
//! asked for, and never grants anything. Durable-enough: each applied id is
//! appended and fsync'd before the answer; a crash between the consent write
//! and this append can only make the vendor's retry apply an already-applied
//! (idempotent) change again.
//!
//! Keys are the first 128 bits of SHA-256(vendor, id), hex: no vendor id is
//! stored as sent. The file is `replay.log` (`<key> <expiry unix s>` lines),
//! rewritten on start and whenever dead lines outnumber live ones.

use crate::state::{self, DirLock};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

const FILE: &str = "replay.log";

pub(crate) struct ReplayCache {
    dir: PathBuf,
    _lock: DirLock,
    file: File,
    /// key → expiry (unix s).
    map: HashMap<String, i64>,
    /// Insertion order, for expiry and the size bound.
    order: VecDeque<(String, i64)>,
    retention: Duration,
    max_entries: usize,
    lines: usize,
}

pub(crate) fn key(vendor: &str, id: &str) -> String {
    let mut h = Sha256::new();
    h.update(vendor.as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    hex::encode(&h.finalize()[..16])
}

fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

impl ReplayCache {
    pub(crate) fn open(
        dir: &Path,
        retention: Duration,
        max_entries: usize,
    ) -> Result<ReplayCache, String> {
        let lock = DirLock::acquire(dir, "webhooks.state_dir")?;
        let path = dir.join(FILE);
        let now = now_s();
        let mut order = VecDeque::new();
        let mut map = HashMap::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines() {
                    let Some((k, exp)) = line.split_once(' ') else {
                        continue;
                    };
                    let Ok(exp) = exp.trim().parse::<i64>() else {
                        continue;
                    };
                    if k.len() == 32 && exp > now {
                        map.insert(k.to_string(), exp);
                        order.push_back((k.to_string(), exp));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        let file = state::private_file_options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut c = ReplayCache {
            dir: dir.to_path_buf(),
            _lock: lock,
            file,
            map,
            order,
            retention,
            max_entries,
            lines: usize::MAX,
        };
        c.trim();
        c.rewrite()?;
        Ok(c)
    }

    /// Whether `key` was applied within the retention.
    pub(crate) fn seen(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|exp| *exp > now_s())
    }

    /// Remember `keys` (durable when this returns `Ok`).
    pub(crate) fn record(&mut self, keys: &[String]) -> Result<(), String> {
        if keys.is_empty() {
            return Ok(());
        }
        let exp = now_s() + self.retention.as_secs() as i64;
        let mut text = String::new();
        for k in keys {
            text.push_str(&format!("{k} {exp}\n"));
            self.map.insert(k.clone(), exp);
            self.order.push_back((k.clone(), exp));
            self.lines += 1;
        }
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| format!("webhook replay cache: {e}"))?;
        self.trim();
        if self.lines > 2 * self.map.len() + 1024 {
            self.rewrite()?;
        }
        Ok(())
    }

    /// Drop expired ids and the oldest beyond the bound.
    fn trim(&mut self) {
        let now = now_s();
        while let Some((k, exp)) = self.order.front().cloned() {
            if exp > now && self.order.len() <= self.max_entries {
                break;
            }
            self.order.pop_front();
            // A later record of the same key keeps it.
            if self.map.get(&k) == Some(&exp) {
                self.map.remove(&k);
            }
        }
    }

    fn rewrite(&mut self) -> Result<(), String> {
        let path = self.dir.join(FILE);
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let mut text = String::with_capacity(self.map.len() * 45);
        for (k, exp) in &self.order {
            if self.map.get(k) == Some(exp) {
                text.push_str(&format!("{k} {exp}\n"));
            }
        }
        let err = |e: std::io::Error| format!("{}: {e}", tmp.display());
        let mut f = state::private_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.file = state::private_file_options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        self.lines = self.map.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_a_restart_and_the_bound_holds() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("wh");
        {
            let mut c = ReplayCache::open(&dir, Duration::from_secs(3600), 3).unwrap();
            assert!(!c.seen(&key("twilio", "SM1")));
            c.record(&[key("twilio", "SM1")]).unwrap();
            assert!(c.seen(&key("twilio", "SM1")));
            assert!(!c.seen(&key("sendgrid", "SM1")), "per vendor");
        }
        let mut c = ReplayCache::open(&dir, Duration::from_secs(3600), 3).unwrap();
        assert!(c.seen(&key("twilio", "SM1")));
        c.record(&[key("t", "a"), key("t", "b"), key("t", "c")])
            .unwrap();
        assert!(
            !c.seen(&key("twilio", "SM1")),
            "the oldest went past the bound"
        );
        assert!(c.seen(&key("t", "c")));
        let text = std::fs::read_to_string(dir.join(FILE)).unwrap();
        assert!(!text.contains("SM1"));
    }
}
